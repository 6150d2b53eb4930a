"""Where evaluation weights live on disk. Nothing here downloads: ``scripts/download_weights.py`` does, on request.

The folder is, in order: an explicit path (config entry ``weights_dir`` / CLI ``--weights-dir``), else
``$MARDINI_WEIGHTS``, else ``../shared/weights/`` (relative to the working directory, then to the repository
root). Inside it the evaluation looks for the public file names below.
"""

from __future__ import annotations

import os
from pathlib import Path

from .i3d import STATE_DICT_FILE, TORCHSCRIPT_FILE

ENV_VAR = "MARDINI_WEIGHTS"
DEFAULT_RELATIVE = Path("..") / "shared" / "weights"
I3D_FILES = (STATE_DICT_FILE, TORCHSCRIPT_FILE)  # preference order
LPIPS_FILES = ("lpips_alex_torchscript.pt", "alex.pth")


def default_weights_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The weights folder (it may not exist)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    candidates = [Path.cwd() / DEFAULT_RELATIVE, Path(__file__).resolve().parents[2] / DEFAULT_RELATIVE]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0].resolve()


def find_i3d_weights(weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The first I3D file present in the weights folder (state_dict preferred), or None."""
    folder = default_weights_dir(weights_dir)
    for name in I3D_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def find_lpips_weights(weights_dir: str | os.PathLike | None = None) -> Path | None:
    folder = default_weights_dir(weights_dir)
    for name in LPIPS_FILES:
        if (folder / name).is_file():
            return folder / name
    return None
