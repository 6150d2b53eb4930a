"""An autoencoder that does no learning: pixels patched into channels. For tests and tiny experiments."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from .base import VideoAutoencoder


class IdentityAutoencoder(VideoAutoencoder):
    """Space-to-depth by patch_size p: [N, 3, H, W] -> [N, 3*p*p, H/p, W/p]; decode is its exact inverse.

    Latents are ``(patched - shift) * scale``, so a pipeline exercises the same normalisation path as with a
    real VAE.
    """

    def __init__(
        self, patch_size: int = 1, scale: float = 1.0, shift: float = 0.0, frames_per_chunk: int | None = None
    ):
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"identity autoencoder: patch_size must be a positive int, got {patch_size!r}")
        if scale == 0:
            raise ValueError("identity autoencoder: scale must be non-zero")
        super().__init__(scaling_factor=scale, shift_factor=shift, frames_per_chunk=frames_per_chunk)
        self.patch_size = patch_size
        self.latent_channels = 3 * patch_size * patch_size
        self.spatial_compression = patch_size

    def encode_frames(self, frames: Tensor) -> Tensor:
        """[N, 3, H, W] -> [N, 3*p*p, H/p, W/p]."""
        p = self.patch_size
        return rearrange(frames, "n c (h p1) (w p2) -> n (c p1 p2) h w", p1=p, p2=p)

    def decode_frames(self, latents: Tensor) -> Tensor:
        """[N, 3*p*p, h, w] -> [N, 3, h*p, w*p]."""
        p = self.patch_size
        return rearrange(latents, "n (c p1 p2) h w -> n c (h p1) (w p2)", p1=p, p2=p)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, scale={self.scaling_factor}, shift={self.shift_factor}"
