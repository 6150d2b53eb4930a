"""Evaluation: I3D + FVD, PSNR/SSIM (LPIPS with local weights), and benchmark protocols.

    i3d.py         the I3D network (public state_dict layout) and StyleGAN-V's TorchScript; preprocessing
    fvd.py         streaming feature statistics, Fréchet distance, FVD between folders / model vs reference,
                   periodic_fvd for the trainer
    metrics.py     per-frame PSNR / SSIM (Gaussian window) / optional LPIPS
    data.py        DAVIS-style frame folders and UCF-style video files
    benchmarks.py  VIDIM-Bench-style interpolation and image-to-video protocols, baselines, model method
    weights.py     where weights are looked for ($MARDINI_WEIGHTS or ../shared/weights/)
    cli.py         `mardini-eval`
"""

from .benchmarks import (BASELINES, PROTOCOLS, Clip, PipelineMethod, ProtocolConfig, linear_blend, load_clips,
                         repeat_nearest, run_benchmark, save_clips, select_clips)
from .config import EvalConfig
from .fvd import (FeatureStats, frechet_distance, fvd_between, fvd_folders, fvd_from_features, fvd_from_stats,
                  fvd_model_vs_reference, load_default_extractor, model_generate_fn, periodic_fvd)
from .i3d import I3DFeatureExtractor, InceptionI3d, load_i3d, load_i3d_state_dict, preprocess_for_i3d
from .metrics import load_lpips, masked_frame_metrics, psnr_frames, ssim_frames
from .weights import default_weights_dir, find_i3d_weights

__all__ = [
    "BASELINES", "PROTOCOLS", "Clip", "PipelineMethod", "ProtocolConfig", "linear_blend", "load_clips",
    "repeat_nearest", "run_benchmark", "save_clips", "select_clips", "EvalConfig", "FeatureStats",
    "frechet_distance", "fvd_between", "fvd_folders", "fvd_from_features", "fvd_from_stats",
    "fvd_model_vs_reference", "load_default_extractor", "model_generate_fn", "periodic_fvd",
    "I3DFeatureExtractor", "InceptionI3d", "load_i3d", "load_i3d_state_dict", "preprocess_for_i3d", "load_lpips",
    "masked_frame_metrics", "psnr_frames", "ssim_frames", "default_weights_dir", "find_i3d_weights",
]
