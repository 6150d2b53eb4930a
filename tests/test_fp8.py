"""FP8 GEMMs for generation (mardini/models/fp8.py): each swapped layer computes the GEMM of its e4m3-rounded
inputs, the model keeps its weights and state_dict, and generation stays as close to float32 as bf16 keeps it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mardini.diffusion import Diffusion, DiffusionConfig
from mardini.models import MarDini, model_config
from mardini.models.fp8 import E4M3_MAX, FP8Linear, check_fp8_device, quantise_rows, use_fp8_gemms
from mardini.models.layers import MLP, CrossAttention, SelfAttention


def dequantised(x: torch.Tensor) -> torch.Tensor:
    q, scale = quantise_rows(x)
    return q.double() * scale.double()


@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_the_gemm_of_its_e4m3_rounded_inputs(dtype, fast_accum):
    torch.manual_seed(0)
    linear = nn.Linear(96, 48).to(dtype)  # widths in multiples of 16, as torch._scaled_mm takes them
    x = torch.randn(3, 7, 96, dtype=dtype) * torch.logspace(-2, 1, 96, dtype=dtype)  # channels of unequal size
    exact = linear(x).double()
    fp8 = FP8Linear(linear, fast_accum).eval()
    with torch.no_grad():
        out = fp8(x)
    assert out.dtype == dtype and out.shape == (3, 7, 48)
    # each row's largest |value| maps to e4m3's largest, and the rounded rows come back within e4m3's 3-bit mantissa
    q, scale = quantise_rows(x.reshape(-1, 96))
    assert torch.allclose(q.float().abs().amax(-1), torch.full((21,), E4M3_MAX))
    assert (dequantised(x.reshape(-1, 96)) - x.reshape(-1, 96).double()).abs().max() <= 2**-4 * x.abs().max()
    # the GEMM of the dequantised inputs, rounded once to bf16
    bias = linear.bias.detach().to(torch.bfloat16).double()  # the GEMM adds the bias in bf16
    emulated = dequantised(x.reshape(-1, 96)) @ dequantised(linear.weight.detach()).T + bias
    assert torch.allclose(out.double().reshape(-1, 48), emulated, rtol=2**-7, atol=1e-5)
    # really rounded: further from the exact layer than bf16 output rounding, yet close
    rel = ((out.double() - exact).norm() / exact.norm()).item()
    assert 5e-3 < rel < 0.1
    assert fp8.weight is linear.weight and fp8.bias is linear.bias


def test_fp8_linear_survives_dtype_moves_and_refuses_training():
    linear = FP8Linear(nn.Linear(32, 16))
    linear.to(torch.bfloat16)  # casts the weight; the e4m3 copy must stay e4m3 (quantised again)
    assert linear.weight_e4m3.dtype == torch.float8_e4m3fn and linear.weight_scale.dtype == torch.float32
    assert set(linear.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="no backward"):
        linear(x)
    with torch.no_grad():
        nn.init.zeros_(linear.weight)
        linear.requantise()
        assert torch.equal(linear(x), linear.bias.expand(4, 16))


def test_use_fp8_gemms_swaps_mlps_and_self_attention_and_keeps_the_state_dict():
    torch.manual_seed(0)
    generator = MarDini(model_config("tiny")).generator.eval()
    state = copy.deepcopy(generator.state_dict())
    mlps = sum(isinstance(m, MLP) for m in generator.modules())
    attentions = sum(isinstance(m, SelfAttention) for m in generator.modules())
    assert mlps and attentions
    assert use_fp8_gemms(generator, ("mlp",)) == 2 * mlps
    assert use_fp8_gemms(generator) == 2 * attentions  # the MLPs are already FP8; now qkv and proj
    assert use_fp8_gemms(generator) == 0
    for m in generator.modules():
        if isinstance(m, MLP):
            assert isinstance(m.fc_in, FP8Linear) and isinstance(m.fc_out, FP8Linear)
        if isinstance(m, SelfAttention):
            assert isinstance(m.qkv, FP8Linear) and isinstance(m.proj, FP8Linear)
        if isinstance(m, CrossAttention):  # its output projection in FP8 triples the error: stays as it was
            assert type(m.proj) is nn.Linear and type(m.q) is nn.Linear
    after = generator.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="unknown"):
        use_fp8_gemms(generator, ("mlp", "cross"))


def test_layers_whose_widths_scaled_mm_cannot_take_stay_bf16_with_a_warning(caplog):
    """torch._scaled_mm takes widths in multiples of 16 only. A generator of width 128 has a SwiGLU hidden width of
    344 (a multiple of 8): its fc_out stays nn.Linear, the swap says so, and the model still generates; FP8Linear
    itself refuses such a layer in one line instead of failing inside the GEMM on the GPU."""
    torch.manual_seed(0)
    model = MarDini(model_config("tiny", generator=dict(dim=128, num_heads=2))).eval()
    mlps = [m for m in model.generator.modules() if isinstance(m, MLP)]
    assert mlps and mlps[0].fc_out.in_features == 344
    with caplog.at_level("WARNING", logger="mardini.models.fp8"):
        swapped = use_fp8_gemms(model.generator)
    assert swapped == 3 * len(mlps)  # fc_in (128 -> 688), qkv, proj; not fc_out (344 -> 128)
    assert all(isinstance(m.fc_in, FP8Linear) and type(m.fc_out) is nn.Linear for m in mlps)
    assert "fc_out (344 -> 128)" in caplog.text and "bf16" in caplog.text
    with pytest.raises(ValueError, match="multiples of 16"):
        FP8Linear(nn.Linear(344, 128))
    T, latent = 3, 8
    x = torch.randn(1, T, model.cfg.latent_channels, latent, latent)
    mask = torch.tensor([[False, True, False]])
    with torch.no_grad():
        out = model.generate(x, mask, Diffusion(DiffusionConfig()), num_steps=2,
                             generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_fp8_generation_stays_as_close_to_float32_as_bf16():
    """Image-to-video with the tiny model (its zero-initialised weights given values, so that the output depends
    on every layer): FP8 GEMMs over bf16 err from float32 no more than bf16 alone does, up to a margin."""
    torch.manual_seed(0)
    model = MarDini(model_config("tiny")).eval()
    for m in model.generator.modules():
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.xavier_uniform_(m.weight)
    z = torch.randn(1, 5, model_config("tiny").latent_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 5, dtype=torch.bool)
    mask[:, 2] = False
    diffusion = Diffusion(DiffusionConfig())

    @torch.inference_mode()
    def generate(m, dtype):
        out = m.to(dtype).generate(z.to(dtype), mask, diffusion, num_steps=4,
                                   generator=torch.Generator().manual_seed(0))
        return out.float()[:, mask[0]]

    reference = generate(model, torch.float32)
    bf16 = generate(copy.deepcopy(model), torch.bfloat16)
    fp8_model = copy.deepcopy(model)
    assert use_fp8_gemms(fp8_model.generator) > 0
    fp8_bf16, fp8_float32 = generate(fp8_model, torch.bfloat16), generate(fp8_model, torch.float32)

    def error(x):
        return ((x - reference).norm() / reference.norm()).item()

    assert 1e-3 < error(fp8_float32) < error(bf16)  # FP8 alone (the rest in float32): below bf16's own error
    assert error(fp8_bf16) < 1.3 * error(bf16)
    assert not torch.equal(fp8_bf16, bf16)


def test_fp8_needs_a_gpu_of_compute_capability_8_9(monkeypatch):
    check_fp8_device(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*A100"):
        check_fp8_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda"))
    with pytest.raises(ValueError, match="compute capability"):
        check_fp8_device(torch.device("meta"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with FP8 GEMMs (run on the lent H100/H200)")
def test_fp8_linear_on_the_gpu_computes_what_it_computes_on_the_cpu():
    torch.manual_seed(0)
    linear = nn.Linear(256, 512).to(torch.bfloat16)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        cpu = FP8Linear(linear, fast_accum=False)(x).float()
        for fast in (False, True):
            gpu = FP8Linear(copy.deepcopy(linear).cuda(), fast_accum=fast)(x.cuda()).float().cpu()
            assert ((gpu - cpu).norm() / cpu.norm()).item() < 6e-3  # bf16 rounding of a different sum order
