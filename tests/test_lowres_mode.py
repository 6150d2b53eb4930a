"""data.lowres_mode: whatever way training made the planner's low-resolution input (pooled latents, or encoded
box-filtered pixels), the export records it and every inference path (MarDiniPipeline, the trainer's validation
videos, evaluation's model_generate_fn) builds exactly the same input from the given frames."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_training import tiny_config
from mardini.evaluation.fvd import model_generate_fn
from mardini.inference import MarDiniPipeline
from mardini.masking import task_mask
from mardini.training.sampling import validation_videos
from mardini.training.trainer import Trainer


def planner_inputs(model) -> list[torch.Tensor]:
    """Every z_lo the planner receives (its first positional argument)."""
    seen = []
    model.planner.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().float().cpu()))
    return seen


@pytest.fixture(scope="module")
def pixels_run(tmp_path_factory):
    """A trainer (no training needed) whose planner input is made from box-filtered pixels, and its export."""
    cfg = tiny_config(tmp_path_factory.mktemp("pixels") / "run", max_steps=1)
    cfg.data.lowres_mode = "pixels"
    trainer = Trainer(cfg)
    return trainer, trainer.export()


@pytest.mark.parametrize("mode", ["latents", "pixels"])
def test_modes_differ_for_the_identity_autoencoder(tmp_path, mode):
    """Otherwise the tests below could not tell the modes apart."""
    cfg = tiny_config(tmp_path / mode, max_steps=1)
    cfg.data.lowres_mode = mode
    trainer = Trainer(cfg)
    clip = trainer.validation_clips(1)
    z_hi, z_lo = trainer._latents({"video": clip})
    pooled = torch.nn.functional.avg_pool2d(z_hi.flatten(0, 1), trainer.model_cfg.lowres_factor).view_as(z_lo)
    assert torch.equal(z_lo, pooled) == (mode == "latents")


def test_export_records_lowres_mode(pixels_run):
    trainer, export = pixels_run
    assert json.loads((export / "config.json").read_text())["lowres_mode"] == "pixels"
    assert MarDiniPipeline.from_pretrained(export).lowres_mode == "pixels"


def test_pipeline_builds_the_training_planner_input(pixels_run):
    trainer, export = pixels_run
    clip = trainer.validation_clips(1)  # [1, T, 3, H, W]
    _, z_lo_train = trainer._latents({"video": clip})
    pipe = MarDiniPipeline.from_pretrained(export)
    seen = planner_inputs(pipe.model)
    T = clip.shape[1]
    pipe.interpolate(clip[0, 0], clip[0, -1], num_steps=1)
    given = [0, T - 1]
    torch.testing.assert_close(seen[0][0, given], z_lo_train[0, given], rtol=0, atol=1e-6)


def test_validation_and_evaluation_build_the_training_planner_input(pixels_run, tmp_path):
    trainer, _ = pixels_run
    clips = trainer.validation_clips(1)
    _, z_lo_train = trainer._latents({"video": clips})
    model = trainer.ema_model()
    seen = planner_inputs(model)
    T = clips.shape[1]
    interpolation = ~task_mask("interpolation", T)

    validation_videos(model, trainer.autoencoder, trainer.diffusion, clips, trainer.cfg.data.lowres_mode,
                      tmp_path / "samples", 0, 1, seed=0)
    torch.testing.assert_close(seen[0][0, interpolation], z_lo_train[0, interpolation], rtol=0, atol=1e-6)

    seen.clear()
    generate = model_generate_fn(model, trainer.autoencoder, trainer.diffusion, trainer.cfg.data.lowres_mode,
                                 num_steps=1)
    mask = task_mask("interpolation", T)[None]
    generate(clips.masked_fill(mask[:, :, None, None, None], 0.0), mask)
    torch.testing.assert_close(seen[0][0, interpolation], z_lo_train[0, interpolation], rtol=0, atol=1e-6)


def test_cache_made_in_another_mode_is_refused(tmp_path):
    """A cache's z_lo was made in one mode; a run that says another would export the wrong mode."""
    from mardini.autoencoders import build_autoencoder
    from mardini.data.latent_cache import build_latent_cache
    from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset

    data = SyntheticVideoDataset(SyntheticVideoConfig(num_videos=4, num_frames=9, height=32, width=32))
    build_latent_cache(tmp_path / "cache", data, build_autoencoder("identity", patch_size=2), lowres_factor=2,
                       lowres_mode="latents", dtype="float32", progress=False)
    cfg = tiny_config(tmp_path / "run", max_steps=1)
    cfg.data.source, cfg.data.cache_dir, cfg.data.lowres_mode = "cache", str(tmp_path / "cache"), "pixels"
    with pytest.raises(ValueError, match=r"lowres_mode: cached 'latents' != data\.lowres_mode='pixels'"):
        Trainer(cfg)
