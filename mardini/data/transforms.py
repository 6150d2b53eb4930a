"""Pixel transforms for decoded clips: resize + crop to the training size, and the planner's low-resolution view.

Decoders give uint8 frames ``[T, H, W, 3]``; the models want float ``[T, 3, H, W]`` in [-1, 1]. ``resize_crop``
picks the crop window in *source* pixels first (the largest window with the target aspect ratio, centred or at a
seeded random offset) and then resizes only that window, so no work is spent on pixels that are cropped away.
Resizing runs on uint8 in channels-last layout (PyTorch's fast antialiased bilinear path) and is deterministic:
the same frames and the same generator give the same tensor in any process.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.layers import box_downsample

CROPS = ("center", "random")


def crop_window(
    src_hw: tuple[int, int], dst_hw: tuple[int, int], crop: str = "center", rng: np.random.Generator | None = None
) -> tuple[int, int, int, int]:
    """The (top, left, height, width) window of a src_hw frame that, resized to dst_hw, fills it exactly.

    The window is the largest one with dst's aspect ratio (the short side is kept whole: "resize the short side,
    then crop"). crop="center" centres it; crop="random" draws its offset from rng.
    """
    (sh, sw), (dh, dw) = src_hw, dst_hw
    if min(sh, sw, dh, dw) < 1:
        raise ValueError(f"crop_window: sizes must be positive, got source {src_hw} and target {dst_hw}")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    scale = max(dh / sh, dw / sw)  # resize factor that makes the source cover the target
    ch, cw = min(sh, max(1, round(dh / scale))), min(sw, max(1, round(dw / scale)))
    if crop == "center":
        return (sh - ch) // 2, (sw - cw) // 2, ch, cw
    if rng is None:
        raise ValueError("crop='random' needs a numpy Generator (seeded per sample, for determinism)")
    return int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1)), ch, cw


def resize_crop(
    frames: np.ndarray | Tensor,
    height: int,
    width: int,
    crop: str = "center",
    rng: np.random.Generator | None = None,
) -> Tensor:
    """uint8 frames [T, H, W, 3] -> float32 [T, 3, height, width] in [-1, 1] (crop, then antialiased bilinear).

    ``rng`` is only used (and then required) for crop="random".
    """
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"resize_crop: frames must be uint8 [T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    top, left, ch, cw = crop_window((x.shape[1], x.shape[2]), (height, width), crop, rng)
    x = x[:, top : top + ch, left : left + cw]
    x = x.permute(0, 3, 1, 2)  # [T, 3, h, w], channels-last in memory: the fast uint8 resize path
    if (ch, cw) != (height, width):
        x = F.interpolate(
            x.contiguous(memory_format=torch.channels_last),
            size=(height, width),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    return x.float().div_(127.5).sub_(1.0).contiguous()


# The same box filter the model applies to latents, so pixel and latent low-resolution views are made alike.
downsample = box_downsample


def lowres_pixels(video: Tensor, factor: int) -> Tensor:
    """The planner's low-resolution pixels: [..., 3, H, W] -> [..., 3, H/r, W/r] by r x r box averaging.

    Use with ``lowres_mode="pixels"``: encode ``lowres_pixels(video, r)`` with the same autoencoder to get z_lo
    (instead of average-pooling z_hi, the default). Works on [T, 3, H, W] clips and [B, T, 3, H, W] batches.
    """
    if video.ndim < 3 or video.shape[-3] != 3:
        raise ValueError(f"lowres_pixels: video must be [..., 3, H, W], got {tuple(video.shape)}")
    return downsample(video, factor)
