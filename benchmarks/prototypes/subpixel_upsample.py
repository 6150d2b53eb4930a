"""Prototype, measured and not kept: a VAE decoder's "repeat each pixel 2x2, then convolve 3x3" computed on the
low-resolution grid.

Image VAEs' decoders (diffusers ``Upsample2D``: nearest-neighbour 2x, then a 3x3 convolution) spend about a quarter
of their work on those convolutions. After the repeat, every 3x3 window covers only 2x2 distinct input pixels, so
each of the four output phases (even/odd row x even/odd column) is a 2x2 convolution of the input whose taps are
sums of the 3x3 taps that land on the same input pixel: 16 multiply-adds per output pixel and input channel
instead of 36, the same function up to rounding. With a 1-pixel zero border the four phases are one convolution
with 4x the output channels, over (H+1) x (W+1) positions, each phase reading its H x W window of it.

Row taps (columns alike), output row 2i + a reads input rows:
    a = 0: i - 1 (tap 0), i (taps 1 + 2)        a = 1: i (taps 0 + 1), i + 1 (tap 2)

Measured on one H200 (bf16, compiled, the FLUX-shaped decoder, 11 frames at 512 px; code of commit eb6647c, where
MarDiniPipeline.compile used it): 27.7 -> 23.5 TFLOP per decode, yet 0.0690 -> 0.0675 s (cuDNN runs the 2x2
kernels at a lower rate and the phases are interleaved by a copy) and peak memory +0.8 GiB; the whole
image-to-video call 0.641 -> 0.643 s. Not kept (BENCHMARKS.md, "Inference, eleventh step"). Used by
`vae_decode.py --subpixel` and `inference.py --vae-subpixel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# FOLD[a, t, k]: how much of the 3x3 kernel's row (or column) tap k goes into phase a's 2-tap kernel, tap t
FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                     [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def subpixel_kernels(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernels [Co, Ci, 3, 3] -> the four phases' 2x2 kernels [4 * Co, Ci, 2, 2], phases (a, c) in the order
    (0, 0), (0, 1), (1, 0), (1, 1); summed in float32 at least and returned in the weight's dtype."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    fold = FOLD.to(weight.device, dtype)
    k = torch.einsum("ayk,cxl,oikl->acoiyx", fold, fold, weight.to(dtype))
    return k.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) for a 3x3 `weight`,
    computed on x's grid. x [B, Ci, H, W] -> [B, Co, 2H, 2W]."""
    b, _, h, w = x.shape
    co = weight.shape[0]
    phases = F.conv2d(x, subpixel_kernels(weight), None if bias is None else bias.repeat(4), padding=1)
    phases = phases.view(b, 2, 2, co, h + 1, w + 1)  # [B, a, c, Co, H + 1, W + 1]
    out = torch.stack([torch.stack([phases[:, a, c, :, a:a + h, c:c + w] for c in (0, 1)], dim=-1)
                       for a in (0, 1)], dim=-3)  # [B, Co, H, a, W, c]
    return out.reshape(b, co, 2 * h, 2 * w)


def _conv_of(upsample: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The 3x3 convolution of a diffusers Upsample2D this module can compute, with its attribute name; else None."""
    if type(upsample).__name__ != "Upsample2D":
        return None
    if not getattr(upsample, "use_conv", False) or getattr(upsample, "use_conv_transpose", True):
        return None
    if not getattr(upsample, "interpolate", False) or getattr(upsample, "norm", None) is not None:
        return None
    name = "conv" if upsample.name == "conv" else "Conv2d_0"
    conv = getattr(upsample, name, None)
    plain = (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
             and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
             and conv.padding_mode == "zeros")
    return (name, conv) if plain else None


class SubpixelUpsample2D(nn.Module):
    """Stands in for a diffusers ``Upsample2D`` (nearest 2x + 3x3 conv), holding its convolution under the same
    attribute name, so the state_dict keys do not change; an explicit ``output_size`` other than 2x takes the
    original path."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        found = _conv_of(upsample)
        if found is None:
            raise ValueError(f"not a nearest-2x + 3x3-conv Upsample2D: {upsample!r}")
        self.conv_name, conv = found
        self.channels = upsample.channels
        setattr(self, self.conv_name, conv)

    def forward(self, x: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        conv = getattr(self, self.conv_name)
        if output_size is not None and tuple(output_size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return conv(F.interpolate(x, size=output_size, mode="nearest"))
        return upsample2x_conv3x3(x, conv.weight, conv.bias)


def use_subpixel_upsampling(module: nn.Module) -> int:
    """Replace, in place, every Upsample2D of `module` that SubpixelUpsample2D computes; returns how many."""
    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if _conv_of(child) is not None]
    for parent, name, child in targets:
        setattr(parent, name, SubpixelUpsample2D(child))
    return len(targets)
