"""Precision: timesteps stay fp32 whatever dtype the networks run in (bf16 models, bf16 latents, autocast), and the
refused precision (fp16) fails at start-up naming the key. The FSDP == DDP comparison under bf16 lives in
tests/test_fsdp.py (it needs two processes)."""

from __future__ import annotations

import pytest
import torch

from mardini.diffusion import Diffusion, DiffusionConfig
from mardini.models import MarDini, model_config

C = 4


def record_generator_time(model: MarDini) -> list[torch.Tensor]:
    """Every model_time tensor the generator receives (its third positional argument)."""
    seen = []
    model.generator.register_forward_hook(lambda mod, args, out: seen.append(args[2].detach().clone()))
    return seen


def tiny_model(dtype=torch.float32) -> MarDini:
    torch.manual_seed(0)
    return MarDini(model_config("tiny", latent_channels=C)).eval().to(dtype)


def test_bf16_generate_feeds_the_scheduler_timesteps_exactly():
    """A bf16 model used to get its timesteps cast to bf16 (997 -> 996): with 7 Euler steps the scheduler's times
    (1000 * 6/7 = 857.14, ...) are not bf16 numbers, so any rounding shows."""
    diffusion = Diffusion(DiffusionConfig(num_inference_steps=7))
    expected = diffusion.make_scheduler().timesteps.float()
    assert any(float(t.bfloat16()) != float(t) for t in expected), "the test needs times bf16 cannot hold"
    model = tiny_model(torch.bfloat16)
    seen = record_generator_time(model)
    mask = torch.tensor([[False, True, True, True, False]])
    z = torch.randn(1, 5, C, 8, 8, dtype=torch.bfloat16)
    model.generate(z, mask, diffusion, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 7
    for time_in, t in zip(seen, expected):
        assert time_in.dtype == torch.float32
        assert torch.equal(time_in[mask], t.expand(3)), (time_in[mask], t)
        assert torch.equal(time_in[~mask], torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_forward_keeps_timesteps_fp32_for_low_precision_latents(dtype):
    diffusion = Diffusion(DiffusionConfig())
    model = tiny_model(dtype)
    seen = record_generator_time(model)
    mask = torch.tensor([[False, True, True, False]])
    z = torch.randn(1, 4, C, 8, 8).to(dtype)
    t = torch.tensor([0.7771])
    with torch.no_grad():
        model(z, None, mask, diffusion, noise=torch.randn_like(z), t=t)
    assert seen[0].dtype == torch.float32
    assert torch.equal(seen[0][mask], (t * 1000).expand(2))  # 777.1, not the bf16 neighbour 777.0


def test_autocast_forward_keeps_timesteps_fp32():
    diffusion = Diffusion(DiffusionConfig())
    model = tiny_model()
    seen = record_generator_time(model)
    mask = torch.tensor([[False, True, True, False]])
    z = torch.randn(1, 4, C, 8, 8)
    t = torch.tensor([0.7771])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(z, None, mask, diffusion, noise=torch.randn_like(z), t=t)
    assert torch.equal(seen[0][mask], (t * 1000).expand(2))
    assert out["target"].dtype == torch.float32 and out["loss"].dtype == torch.float32


def test_fp16_is_refused_at_start_naming_the_key(tmp_path):
    """fp16 needs loss scaling through clipping and skipped steps, which the trainer does not do: refused."""
    from helpers_training import tiny_config
    from mardini.training.config import validate_config

    with pytest.raises(ValueError, match=r"train\.mixed_precision=fp16 is not supported.*bf16"):
        validate_config(tiny_config(tmp_path / "run", mixed_precision="fp16"))
