"""Evaluation during training: PSNR/SSIM always, FVD when I3D weights are present (random weights here)."""

import math

import pytest
import torch

from helpers_training import tiny_config
from mardini.evaluation.i3d import InceptionI3d
from mardini.evaluation.metrics import PSNR_MAX_DB
from mardini.training.trainer import Trainer


def test_periodic_evaluation_with_and_without_i3d_weights(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    torch.save(InceptionI3d().state_dict(), weights / "i3d_pretrained_400.pt")
    cfg = tiny_config(tmp_path / "run", max_steps=2, eval_every=2, eval_num_videos=2, sample_steps=2,
                      eval_weights_dir=str(weights))
    trainer = Trainer(cfg)
    first = trainer.evaluate()
    assert {f"val/{task}_{m}" for task in ("interpolation", "i2v") for m in ("psnr", "ssim", "fvd")} <= set(first)
    # The reference features are computed once and reused; the fixed set and seeds make it deterministic.
    assert len(trainer._fvd_cache) == 1
    reference = next(iter(trainer._fvd_cache.values()))
    assert trainer.evaluate() == first
    # synthetic clips: the ceiling of the same clips (what their first and last frames leave open), once per run
    from mardini.evaluation.learning import ceiling, held_out_synthetic_config
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg.data, resolve=True)
    best = ceiling(held_out_synthetic_config(data, 2), trainer.validation_clips(2), "interpolation", 32, cfg.seed)
    assert first["val/interpolation_ceiling_psnr"] == best["posterior_mean_psnr"]
    assert first["val/interpolation_ceiling_psnr"] > first["val/interpolation_blend_psnr"] + 3
    # the same metrics on methods that return the validation clips themselves, plus noise: the clips score
    # perfectly (PSNR at its 200 dB cap, SSIM 1, FVD ~0), and every metric gets worse as the noise grows
    from mardini.evaluation.fvd import periodic_fvd

    clips = trainer.validation_clips(2)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    scores = {s: periodic_fvd(lambda given, mask, s=s: (clips + s * noise).clamp(-1, 1), clips,
                              trainer._fvd_extractor, tasks=("interpolation",), cache=trainer._fvd_cache)
              for s in (0.0, 0.1, 0.5)}
    # the second evaluation and these calls reused the reference features (the same object, not recomputed)
    assert len(trainer._fvd_cache) == 1 and next(iter(trainer._fvd_cache.values())) is reference
    psnr, ssim, fvd = ([scores[s][f"val/interpolation_{m}"] for s in (0.0, 0.1, 0.5)] for m in ("psnr", "ssim", "fvd"))
    assert psnr[0] == PSNR_MAX_DB and psnr[1] > psnr[2] and ssim[0] == 1.0 and ssim[1] > ssim[2], (psnr, ssim)
    assert abs(fvd[0]) < 1e-6 * fvd[1] and fvd[1] < fvd[2], fvd
    # a model that has never trained (2 sampler steps) is imperfect: on both tasks its PSNR is below that of the
    # clips with mild noise, and its FVD is above theirs
    i2v = periodic_fvd(lambda given, mask: (clips + 0.1 * noise).clamp(-1, 1), clips, tasks=("i2v",))
    assert first["val/interpolation_psnr"] < psnr[1] and first["val/interpolation_ssim"] < 1.0, first
    assert first["val/interpolation_fvd"] > fvd[1], (first, fvd)
    assert first["val/i2v_psnr"] < i2v["val/i2v_psnr"] and first["val/i2v_ssim"] < 1.0, (first, i2v)

    no_weights = tiny_config(tmp_path / "run2", max_steps=2, eval_num_videos=2, sample_steps=2,
                             eval_weights_dir=str(tmp_path / "empty"))
    metrics = Trainer(no_weights).evaluate()
    assert "val/interpolation_psnr" in metrics and not any(k.endswith("_fvd") for k in metrics)
    assert metrics["val/interpolation_psnr"] == first["val/interpolation_psnr"]  # same init, same clips, same seed


def test_validation_samples_in_the_training_precision_and_fvd_features_in_fp32(tmp_path, monkeypatch):
    """Under train.mixed_precision=bf16 the EMA copy samples under bf16 autocast (the validation videos, the periodic
    evaluation and its posterior mean); the I3D features of FVD are computed outside it, as their fp32 reference."""
    from mardini.models.generator import Generator

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    torch.save(InceptionI3d().state_dict(), weights / "i3d_pretrained_400.pt")
    seen = {"generator": [], "i3d": []}

    def recording(cls, method, key):
        original = getattr(cls, method)

        def call(self, *args, **kwargs):
            seen[key].append(torch.is_autocast_enabled("cpu"))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, call)

    recording(Generator, "forward", "generator")
    recording(InceptionI3d, "features", "i3d")
    for precision, autocast in (("bf16", True), ("no", False)):
        seen["generator"].clear()
        seen["i3d"].clear()
        trainer = Trainer(tiny_config(tmp_path / precision, max_steps=2, eval_num_videos=2, sample_steps=2,
                                      eval_weights_dir=str(weights), mixed_precision=precision))
        metrics = trainer.evaluate()
        trainer.sample()
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert len(seen["generator"]) > 4 and all(x is autocast for x in seen["generator"]), (precision, seen)
        assert seen["i3d"] and not any(seen["i3d"]), seen["i3d"]
        trainer._release_lock()


def uneven_clips() -> tuple[torch.Tensor, torch.Tensor]:
    """(clips [2, 5, 3, 8, 8], copies whose frames 1, 2, 3 carry noise of growing size): about 60, 40 and 20 dB per
    frame, whose mean (40 dB) is far above the PSNR of the clip's mean squared error (~25 dB)."""
    clips = torch.rand(2, 5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.6
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor([0.0, 0.002, 0.02, 0.2, 0.0])
    return clips, clips + scale[None, :, None, None, None] * noise


def test_periodic_evaluation_psnr_is_the_learning_benchmarks_per_clip_psnr():
    """eval.jsonl puts the samples' PSNR beside the posterior mean's and the blend's, which are per-clip PSNRs (the
    learning benchmark's): the samples' must be one too, or a curve compares two averages (the mean of per-frame
    PSNRs scores these ~15 dB higher)."""
    from mardini.evaluation.fvd import periodic_fvd
    from mardini.evaluation.metrics import clip_psnr, psnr_frames
    from mardini.masking import task_mask

    mask = task_mask("interpolation", 5)  # frames 1-3 generated
    clips, generated = uneven_clips()
    report = periodic_fvd(lambda given, m: generated, clips, tasks=("interpolation",))
    assert report["val/interpolation_psnr"] == pytest.approx(clip_psnr(generated, clips, mask).mean().item())
    per_frame = psnr_frames(generated[:, mask].flatten(0, 1), clips[:, mask].flatten(0, 1)).mean().item()
    assert per_frame > report["val/interpolation_psnr"] + 10, (per_frame, report)
    exact = periodic_fvd(lambda given, m: clips, clips, tasks=("interpolation",))
    assert exact["val/interpolation_psnr"] == PSNR_MAX_DB  # capped, not inf


def test_validation_videos_report_per_clip_psnr_under_their_own_names(tmp_path):
    """The end-of-run (and train.sample_every) videos score their few clips with the same per-clip PSNR, logged as
    samples/<task>_psnr beside the videos: under val/ they shared a name with the periodic evaluation's figure of
    another clip set at the same step."""
    from mardini.evaluation.metrics import clip_psnr
    from mardini.masking import task_mask
    from mardini.training.sampling import VALIDATION_TASKS, validation_videos

    trainer = Trainer(tiny_config(tmp_path / "run", max_steps=1))
    clips = trainer.validation_clips(2)
    seen = {}
    decode = trainer.autoencoder.decode

    def recording_decode(z):
        seen.setdefault("frames", []).append(decode(z))
        return seen["frames"][-1]

    trainer.autoencoder.decode = recording_decode
    metrics, paths, _ = validation_videos(trainer.ema_model(), trainer.autoencoder, trainer.diffusion, clips,
                                          trainer.cfg.data.lowres_mode, tmp_path / "samples", 0, 2, seed=0)
    assert set(metrics) == {f"samples/{task}_psnr" for task in VALIDATION_TASKS} and set(paths) == set(VALIDATION_TASKS)
    for (task, spec), frames in zip(VALIDATION_TASKS.items(), seen["frames"]):
        mask = task_mask(**spec, num_frames=clips.shape[1])
        assert metrics[f"samples/{task}_psnr"] == pytest.approx(clip_psnr(frames, clips, mask).mean().item())
    assert not set(metrics) & set(trainer.evaluate())  # no name shared with the periodic evaluation
    trainer._release_lock()
