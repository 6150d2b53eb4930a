"""FP8 GEMMs for generation: the generator's largest linear layers computed from e4m3 inputs.

On Hopper an FP8 GEMM runs at up to twice bf16's rate. Rounding a layer's inputs to e4m3, with one scale per token
for the activations and one per output channel for the weights (torch._scaled_mm's rowwise mode), leaves
image-to-video samples of the paper generator as far from float32 as bf16 leaves them when the layers are the
SwiGLU MLPs and the self-attention's projections (relative L2 1.315e-2 against bf16's 1.312e-2); the cross-attention's
output projection in FP8 triples that error, so it stays bf16 (BENCHMARKS.md, "Inference, eleventh step" and
"twelfth step"). Generation only: the weights are quantised once, and nothing here has a backward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mardini.models.layers import MLP, SelfAttention

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
FP8_LAYERS = ("mlp", "qkv", "proj")  # the SwiGLU MLPs' fc_in and fc_out; the self-attention's qkv and proj
FP8_MULTIPLE = 16  # torch._scaled_mm takes inner and output widths in multiples of 16


def fp8_fits(linear: nn.Linear) -> bool:
    """Whether torch._scaled_mm can compute this layer (both widths multiples of FP8_MULTIPLE)."""
    return linear.in_features % FP8_MULTIPLE == 0 and linear.out_features % FP8_MULTIPLE == 0


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with x ~ e4m3 * scale, each row's largest |value| -> 448."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


class FP8Linear(nn.Linear):
    """An nn.Linear (the same parameters and state_dict keys) whose GEMM takes e4m3 inputs: the weight quantised once
    per output channel (buffers left out of the state_dict; call `requantise` after changing the weight), the input
    per token at every call, accumulated by the GEMM, bf16 out (the only output rowwise scaling gives), returned in
    the input's dtype. fast_accum: Hopper's faster FP8 accumulation (fewer bits per partial sum; measured within
    bf16's spread on the paper generator)."""

    def __init__(self, linear: nn.Linear, fast_accum: bool = True):
        if not fp8_fits(linear):
            raise ValueError(f"FP8Linear needs widths in multiples of {FP8_MULTIPLE} (torch._scaled_mm), got "
                             f"{linear.in_features} -> {linear.out_features}: keep this layer in bf16")
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias, self.fast_accum = linear.weight, linear.bias, fast_accum
        self.register_buffer("weight_e4m3", None, persistent=False)
        self.register_buffer("weight_scale", None, persistent=False)
        self.requantise()

    @torch.no_grad()
    def requantise(self) -> None:
        self.weight_e4m3, self.weight_scale = quantise_rows(self.weight)

    def _apply(self, fn, recurse=True):
        """.to(dtype) would cast the e4m3 copy and its scales like any floating-point tensor: quantise again from
        the weight as it now is (after .to(device) too, which is then the same copy)."""
        super()._apply(fn, recurse)
        self.requantise()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            raise RuntimeError("FP8Linear is for generation (no backward): run it under torch.no_grad() or "
                               "torch.inference_mode()")
        x2, x_scale = quantise_rows(x.reshape(-1, x.shape[-1]))
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        if x.device.type == "cuda":
            out = torch._scaled_mm(x2, self.weight_e4m3.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                                   bias=bias, out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        else:  # the same arithmetic in float32: what torch 2.13's CPU _scaled_mm gives, on any torch release
            out = (x2.float() * x_scale) @ (self.weight_e4m3.float() * self.weight_scale).t()
            out = (out if bias is None else out + bias.float()).to(torch.bfloat16)
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def check_fp8_device(device: torch.device) -> None:
    """FP8 GEMMs run on CUDA devices of compute capability 8.9 or more (Ada, Hopper, Blackwell) and, emulated in
    float32, on the CPU (where the tests check them); anything else is refused with what is needed."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ValueError(f"FP8 GEMMs need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or newer), not "
                         f"{name}: generate without FP8")


def use_fp8_gemms(generator: nn.Module, layers: tuple[str, ...] = FP8_LAYERS, fast_accum: bool = True) -> int:
    """Swap the named linear layers of `generator` (see FP8_LAYERS) for FP8Linear in place; returns how many. The
    weights and state_dict keys stay; the layers already in FP8 are left as they are, and so, with a warning, are
    those whose widths torch._scaled_mm cannot take (fp8_fits; e.g. the SwiGLU fc_out of a width-128 model, whose
    hidden width 344 is a multiple of 8 only)."""
    unknown = set(layers) - set(FP8_LAYERS)
    if unknown:
        raise ValueError(f"FP8 layers {sorted(unknown)} unknown: choose among {', '.join(FP8_LAYERS)}")
    check_fp8_device(next(generator.parameters()).device)
    mlp_names = ["fc_in", "fc_out"] if "mlp" in layers else []
    attention_names = [n for n in ("qkv", "proj") if n in layers]
    swapped, unfit = 0, set()
    for module in list(generator.modules()):
        names = mlp_names if isinstance(module, MLP) else attention_names if isinstance(module, SelfAttention) else []
        for name in names:
            linear = getattr(module, name)
            if type(linear) is not nn.Linear:
                continue
            if not fp8_fits(linear):
                unfit.add(f"{name} ({linear.in_features} -> {linear.out_features})")
                continue
            setattr(module, name, FP8Linear(linear, fast_accum))
            swapped += 1
    if unfit:
        log.warning("FP8 GEMMs: %s kept in bf16, widths not multiples of %d (torch._scaled_mm)",
                    ", ".join(sorted(unfit)), FP8_MULTIPLE)
    return swapped
