"""The interface every autoencoder wrapper follows, so models and pipelines never care which VAE is used.

Pixels are video batches [B, T, 3, H, W] in [-1, 1]; latents are [B, T, C, H/s, W/s], already normalised
(``(z - shift_factor) * scaling_factor``) so the diffusion model sees roughly unit variance.

Per-frame image autoencoders (diffusers ``AutoencoderKL``, the identity) implement only ``encode_frames`` /
``decode_frames`` on raw latents; this base class folds time into the batch, runs frames in chunks to bound
memory, and applies the normalisation and the final clamp. Video autoencoders that mix frames (temporal
compression) override ``encode`` / ``decode`` instead and set ``temporal_compression``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


class VideoAutoencoder(torch.nn.Module):
    """Base class: maps pixel videos to normalised latent videos and back."""

    latent_channels: int  # C
    spatial_compression: int  # pixels per latent cell along H and W
    temporal_compression: int = 1  # frames per latent frame (1 for per-frame autoencoders)

    def __init__(
        self, scaling_factor: float = 1.0, shift_factor: float = 0.0, frames_per_chunk: int | None = None
    ):
        super().__init__()
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.frames_per_chunk = frames_per_chunk  # None: all frames of the batch at once

    # --- what a per-frame subclass implements (raw, un-normalised latents) ---------------------------------

    def encode_frames(self, frames: Tensor) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> raw latents [N, C, H/s, W/s]."""
        raise NotImplementedError

    def decode_frames(self, latents: Tensor) -> Tensor:
        """Raw latents [N, C, h, w] -> [N, 3, h*s, w*s] (not yet clamped)."""
        raise NotImplementedError

    # --- the public interface ------------------------------------------------------------------------------

    def encode(self, video: Tensor) -> Tensor:
        """[B, T, 3, H, W] in [-1, 1] -> normalised latents [B, T, C, H/s, W/s]."""
        _check_5d(video, "video")
        s = self.spatial_compression
        if video.shape[-2] % s or video.shape[-1] % s:
            raise ValueError(
                f"video height and width {tuple(video.shape[-2:])} must be divisible by the "
                f"spatial compression {s}"
            )
        b = video.shape[0]
        z = self._per_frame(self.encode_frames, rearrange(video, "b t c h w -> (b t) c h w"))
        z = (z - self.shift_factor) * self.scaling_factor
        return rearrange(z, "(b t) c h w -> b t c h w", b=b)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, T, C, h, w] -> [B, T, 3, h*s, w*s] clamped to [-1, 1]."""
        _check_5d(latents, "latents")
        b = latents.shape[0]
        z = rearrange(latents, "b t c h w -> (b t) c h w") / self.scaling_factor + self.shift_factor
        x = self._per_frame(self.decode_frames, z)
        return rearrange(x, "(b t) c h w -> b t c h w", b=b).clamp(-1.0, 1.0)

    def describe(self) -> dict:
        """JSON-able description (a latent cache records it and refuses a run with a different autoencoder)."""
        return {"class": type(self).__name__, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "latent_channels": self.latent_channels,
                "spatial_compression": self.spatial_compression, "temporal_compression": self.temporal_compression,
                "repr": self.extra_repr()}

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape (T', C, h, w) of the latents of one [num_frames, 3, height, width] clip."""
        s, r = self.spatial_compression, self.temporal_compression
        return (num_frames // r, self.latent_channels, height // s, width // s)

    def _per_frame(self, fn, frames: Tensor) -> Tensor:
        """Apply fn to [N, ...] frames in chunks of frames_per_chunk (to bound activation memory)."""
        n = self.frames_per_chunk
        if n is None or frames.shape[0] <= n:
            return fn(frames)
        return torch.cat([fn(chunk) for chunk in frames.split(n)], dim=0)


def _check_5d(x: Tensor, name: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} must be [B, T, C, H, W], got shape {tuple(x.shape)}")
