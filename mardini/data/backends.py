"""Optional media packages (PyAV, decord, imageio-ffmpeg), imported only when a video is read or written.

None of them is needed to import mardini, so a machine with little room (or no wheel for decord) can leave some
out. Reading needs decord or PyAV; writing mp4 (training's sample videos too) needs imageio-ffmpeg or PyAV. A
missing one raises ``MissingBackendError`` naming the package to install, when a video is read or written, or
when a run checks at start what it will need.
"""

from __future__ import annotations

import importlib

NAMES = {"av": "PyAV", "decord": "decord", "imageio_ffmpeg": "imageio-ffmpeg"}  # module -> package name
PIP = {"av": "av", "decord": "decord", "imageio_ffmpeg": "imageio-ffmpeg"}  # module -> pip install argument


class MissingBackendError(ImportError):
    """No installed package can read or write this kind of video; the message names what to install."""


def available(module: str) -> bool:
    """True when `module` imports (decord is imported after PyAV, see ``load``)."""
    try:
        load(module)
    except Exception:  # not installed, or installed but broken (e.g. a missing shared library)
        return False
    return True


def load(module: str):
    """Import an optional backend. PyAV goes first whenever decord is loaded: decord ships its own FFmpeg and the
    other order can break PyAV's libvpx encoder in the same process."""
    if module == "decord":
        try:
            import av  # noqa: F401
        except ImportError:
            pass
    return importlib.import_module(module)


def require(task: str, *modules: str):
    """The first of `modules` that imports, else MissingBackendError naming them and the pip command."""
    for module in modules:
        try:
            return load(module)
        except Exception:
            continue
    names = " or ".join(NAMES.get(m, m) for m in modules)
    raise MissingBackendError(f"{task} needs {names}, and none can be imported: pip install "
                              f"{PIP.get(modules[-1], modules[-1])}")
