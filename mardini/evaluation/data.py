"""Reading evaluation videos from local folders: DAVIS-style frame folders and UCF101-style video files.

A dataset root may hold either (or both):
  * frame folders: ``<root>/<video>/00000.jpg, 00001.jpg, ...`` (any folder, at any depth, that directly holds
    images; frames are taken in sorted file-name order), as DAVIS ``JPEGImages/480p/<video>/`` is laid out;
  * video files: ``<root>/**/<name>.avi|.mp4|...`` (any depth, as UCF101's ``<Class>/v_..._gXX_cYY.avi``).
A video's id is its path relative to the root (POSIX separators), so ids are stable across machines.

Frames come back as uint8 [T, H, W, 3]; ``to_model_frames`` turns them into this project's [T, 3, H, W] floats in
[-1, 1] at a fixed resolution (short side scaled with antialiasing, then centre crop: the same rule as
MarDiniPipeline.preprocess, so a model and the ground truth see the same pixels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_FILE_SUFFIXES = (".mp4", ".avi", ".webm", ".mov", ".mkv", ".gif")


@dataclass(frozen=True)
class VideoSource:
    id: str  # path relative to the root, POSIX separators
    path: Path
    kind: str  # "frames" (a folder of images) or "video" (a file)


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_videos(root: str | Path) -> list[VideoSource]:
    """Every frame folder and video file under root, sorted by id. Raises if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    sources = []
    for path in sorted(root.rglob("*")):
        if path.name.startswith("."):
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_file() and path.suffix.lower() in VIDEO_FILE_SUFFIXES:
            sources.append(VideoSource(rel, path, "video"))
        elif path.is_dir() and _frame_files(path):
            sources.append(VideoSource(rel, path, "frames"))
    if not sources:
        raise FileNotFoundError(f"no frame folders ({', '.join(IMAGE_SUFFIXES)}) or video files "
                                f"({', '.join(VIDEO_FILE_SUFFIXES)}) under {root}")
    return sorted(sources, key=lambda s: s.id)


def _decord_read(path: Path, indices: Sequence[int] | None, count_only: bool = False):
    """decord (fast seeking) when installed and able; None otherwise. decord fails on some small frame sizes
    (e.g. widths that are not a multiple of 32: 'DECORDArrayCopyFromTo: The size must exactly match'), and
    cannot read GIFs; the caller then decodes with PyAV."""
    if path.suffix.lower() == ".gif":
        return None
    try:
        import decord

        reader = decord.VideoReader(str(path), num_threads=1)
        if count_only:
            return len(reader)
        idx = list(range(len(reader))) if indices is None else [int(i) for i in indices]
        return reader.get_batch(idx).asnumpy()
    except Exception as exc:  # noqa: BLE001 - ImportError or a decoder failure: fall back to PyAV
        log.debug("decord could not read %s (%s); using PyAV", path, exc)
        return None


def count_frames(source: VideoSource) -> int:
    """Number of frames (decoded count for files, so containers with a wrong header count still work)."""
    if source.kind == "frames":
        return len(_frame_files(source.path))
    n = _decord_read(source.path, None, count_only=True)
    return n if n is not None else len(_read_all_pyav(source.path))


def _read_all_pyav(path: Path) -> np.ndarray:
    """Every frame, decoded with PyAV, as uint8 [T, H, W, 3]. A file PyAV cannot decode raises a ValueError that
    names it and the fix (FFmpeg's own message, e.g. "[Errno 1094995529] Invalid data ...", says neither)."""
    import av

    from ..data.decode import rgb24_converter

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            to_rgb = rgb24_converter()
            frames = [to_rgb(frame) for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as e:  # IndexError: a file without a video stream
        reason = getattr(e, "strerror", None) or "no video stream"
        raise ValueError(f"cannot decode the video {path} ({reason}): remove it from the folder or re-encode it "
                         f"(e.g. ffmpeg -i {path.name} -c:v libx264 fixed.mp4)") from None
    if not frames:
        raise ValueError(f"no video frames could be decoded from {path}")
    return np.stack(frames)


def read_frames(source: VideoSource, indices: Sequence[int] | None = None) -> np.ndarray:
    """Frames at indices (all when None) as uint8 [T, H, W, 3]."""
    if source.kind == "frames":
        from PIL import Image

        files = _frame_files(source.path)
        picked = files if indices is None else [files[i] for i in indices]
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in picked])
    frames = _decord_read(source.path, indices)
    if frames is not None:
        return frames
    frames = _read_all_pyav(source.path)
    return frames if indices is None else frames[list(indices)]


def to_model_frames(frames: np.ndarray, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, height, width] in [-1, 1]: scale so the frame covers the target
    (bilinear, antialiased), then centre crop. No resizing when both height and width are None; one alone is an
    error (it would silently mean no resize)."""
    if (height is None) != (width is None):
        raise ValueError(f"give both height and width to resize, or neither (got height={height}, width={width})")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if height is None:
        return x
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        x = x[:, :, top:top + height, left:left + width]
    return x.clamp(-1, 1).contiguous()
