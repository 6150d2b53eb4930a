"""Autoencoders: pixel videos [B, T, 3, H, W] <-> normalised latents [B, T, C, H/s, W/s]."""

from __future__ import annotations

from .base import VideoAutoencoder
from .identity import IdentityAutoencoder
from .kl import KLAutoencoder, VideoKLAutoencoder

# name -> class; a new wrapper registers itself here so configs can select it by name.
AUTOENCODERS: dict[str, type[VideoAutoencoder]] = {
    "identity": IdentityAutoencoder,
    "kl": KLAutoencoder,  # diffusers AutoencoderKL (SD / SDXL / FLUX VAEs), per frame
    "kl_video": VideoKLAutoencoder,  # diffusers video VAE (AutoencoderKLCogVideoX, ...), temporal compression
}


def build_autoencoder(name: str, **kwargs) -> VideoAutoencoder:
    """Build an autoencoder by its config name, e.g. ``build_autoencoder("identity", patch_size=2)``."""
    if name not in AUTOENCODERS:
        raise ValueError(f"unknown autoencoder {name!r}; known names: {sorted(AUTOENCODERS)}")
    return AUTOENCODERS[name](**kwargs)


__all__ = [
    "AUTOENCODERS",
    "IdentityAutoencoder",
    "KLAutoencoder",
    "VideoAutoencoder",
    "VideoKLAutoencoder",
    "build_autoencoder",
]
