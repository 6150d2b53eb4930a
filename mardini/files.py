"""How mardini's files are published: weights with the modes the user's umask gives ordinary files.

Why a module of its own: exports (mardini/export.py), checkpoints (mardini/training/checkpoint.py) and latent-cache
shards (mardini/data/latent_cache.py) all write safetensors files, and none of those should depend on the others.
"""

from __future__ import annotations

import os
from pathlib import Path


def follow_umask(*paths: str | Path) -> None:
    """Give files the mode the umask gives ordinary files (0o666 & ~umask): safetensors' save_file creates them 0600
    whatever the umask, so exports, checkpoints and caches were unreadable to teammates on a shared cluster while the
    json beside them was not. Call before the rename that publishes them."""
    umask = os.umask(0)  # reading the umask sets it: put it back at once
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)
