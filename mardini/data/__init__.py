"""Training data: synthetic videos, real videos (decord / PyAV), manifests, transforms, the latent cache.

Names are imported lazily (PEP 562), so ``import mardini.data.synthetic`` does not load the video decoders.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SyntheticVideoConfig": "synthetic",
    "SyntheticVideoDataset": "synthetic",
    "VideoDataConfig": "video",
    "VideoDataset": "video",
    "SkipStats": "video",
    "VideoDecodeError": "decode",
    "VideoTooShortError": "decode",
    "TooManyFailuresError": "video",
    "clip_indices": "decode",
    "open_video": "decode",
    "probe_video": "decode",
    "read_clip": "decode",
    "read_frames": "decode",
    "skipped_paths": "video",
    "Manifest": "manifest",
    "ManifestEntry": "manifest",
    "VIDEO_EXTENSIONS": "manifest",
    "load_manifest": "manifest",
    "read_manifest": "manifest",
    "scan_folder": "manifest",
    "write_manifest": "manifest",
    "lowres_pixels": "transforms",
    "resize_crop": "transforms",
    "CachedLatentDataset": "latent_cache",
    "LatentCacheWriter": "latent_cache",
    "build_latent_cache": "latent_cache",
    "encode_hi_lo": "latent_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
