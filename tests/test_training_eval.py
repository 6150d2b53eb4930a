"""Evaluation during training: PSNR/SSIM always, FVD when I3D weights are present (random weights here)."""

import math

import torch

from helpers_training import tiny_config
from mardini.evaluation.i3d import InceptionI3d
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
    for task in ("interpolation", "i2v"):
        assert math.isfinite(first[f"val/{task}_psnr"]) and 0 < first[f"val/{task}_ssim"] <= 1
        assert math.isfinite(first[f"val/{task}_fvd"]) and first[f"val/{task}_fvd"] > 0
    # The reference features are computed once and reused; the fixed set and seeds make it deterministic.
    assert len(trainer._fvd_cache) == 1
    assert trainer.evaluate() == first

    no_weights = tiny_config(tmp_path / "run2", max_steps=2, eval_num_videos=2, sample_steps=2,
                             eval_weights_dir=str(tmp_path / "empty"))
    metrics = Trainer(no_weights).evaluate()
    assert "val/interpolation_psnr" in metrics and not any(k.endswith("_fvd") for k in metrics)
    assert metrics["val/interpolation_psnr"] == first["val/interpolation_psnr"]  # same init, same clips, same seed
