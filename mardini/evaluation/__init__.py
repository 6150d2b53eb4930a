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

import importlib

# Names exported here, by submodule. Imported lazily (PEP 562), so that e.g. ``mardini.evaluation.fvd`` and
# ``mardini.evaluation.i3d`` load without the video-writing stack (imageio-ffmpeg) that benchmarks.py needs.
_EXPORTS = {
    "benchmarks": ("BASELINES", "PROTOCOLS", "Clip", "PipelineMethod", "ProtocolConfig", "linear_blend",
                   "load_clips", "repeat_nearest", "run_benchmark", "save_clips", "select_clips"),
    "config": ("EvalConfig",),
    "fvd": ("FeatureStats", "frechet_distance", "fvd_between", "fvd_folders", "fvd_from_features", "fvd_from_stats",
            "fvd_model_vs_reference", "load_default_extractor", "model_generate_fn", "periodic_fvd"),
    "i3d": ("I3DFeatureExtractor", "InceptionI3d", "load_i3d", "load_i3d_state_dict", "preprocess_for_i3d"),
    "metrics": ("load_lpips", "masked_frame_metrics", "psnr_frames", "ssim_frames"),
    "weights": ("default_weights_dir", "find_i3d_weights"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
