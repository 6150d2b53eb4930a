"""Decoding video files: decord first, PyAV as the fallback; probing; clip sampling. No torch needed here.

- ``open_video(path)`` -> a reader with ``num_frames``, ``fps`` and ``get(indices) -> uint8 [T, H, W, 3]``
  (``DecordReader``; ``PyAVReader`` where decord is missing).
- ``read_clip(path, pick)`` decodes the frames ``pick(num_frames, fps)`` chooses, retrying with PyAV when
  decord cannot open or decode the file (backend="auto"); errors name the file and what each backend said.
- ``clip_indices(...)`` is the usual ``pick``: T frames at a target fps (or every ``stride``-th frame), starting
  at a seeded random, the first or the centre position of an allowed window of the file.
- ``probe_video(path)`` -> frames, fps, size (container metadata, plus a decode of the first and last frames).

Frame i is the i-th frame in presentation order (decord's indexing); PyAV finds it from timestamps
(``round((pts - start) * time_base * fps)``), which agrees on constant-frame-rate files.

Libraries are optional and imported on first use (``backends.py``): decord or PyAV must be installed to read a
video, not to import this module. decord ships its own FFmpeg, so PyAV is imported before it - the other order can
break PyAV's libvpx encoder in the same process. What the decoders print on stderr while failing on a file
("moov atom not found", decord's "video_reader.cc ... ERROR") is captured into that file's error message.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

import numpy as np

from . import backends
from .backends import MissingBackendError

BACKENDS = ("auto", "decord", "pyav")
CLIP_STARTS = ("random", "first", "center")


class VideoDecodeError(RuntimeError):
    """A file that cannot give the requested clip (unreadable, truncated, ...). The dataset skips it."""


class VideoTooShortError(VideoDecodeError):
    """The file (or its manifest window) holds fewer frames than one clip needs."""


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What ``probe_video`` learns about a file."""

    num_frames: int
    fps: float
    height: int
    width: int

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def decord_available() -> bool:
    return backends.available("decord")


def _av():
    return backends.require("reading this video", "av")


def rgb24_converter(threads: int = 1) -> Callable:
    """A function PyAV VideoFrame -> uint8 [H, W, 3] with a scaler of its own, made in the calling process.

    ``frame.to_ndarray(format="rgb24")`` goes through a scaler PyAV (>= 17) caches per thread, running on a pool of
    slice threads. A process forked after the parent converted a frame (a DataLoader worker) inherits that cache but
    not the pool's threads, and its first conversion waits for them forever. A scaler made here cannot be inherited
    half-alive, and its thread count is ours (1: data workers are the parallelism)."""
    reformatter = _av().video.reformatter.VideoReformatter()
    return lambda frame: reformatter.reformat(frame, format="rgb24", threads=threads).to_ndarray()


class CapturedStderr:
    """Redirects file descriptor 2 (where FFmpeg and decord print, below Python) to a temporary file for the
    block; ``text`` then holds what was printed, so it can join the error message instead of cluttering the
    console."""

    def __enter__(self):
        self.text = ""
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no fd 2 (embedded interpreters): capture nothing
            self._saved = None
            return self
        self._file = tempfile.TemporaryFile()
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return False
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()
        return False

    def summary(self, limit: int = 300) -> str:
        """The distinct non-empty lines, joined: '' when nothing was printed."""
        lines = list(dict.fromkeys(line.strip() for line in self.text.splitlines() if line.strip()))
        text = "; ".join(lines)
        return text if len(text) <= limit else text[: limit - 3] + "..."


class DecordReader:
    """Random access through decord (frame-accurate seeking, fast for sparse indices)."""

    backend = "decord"

    def __init__(self, path: str, num_threads: int = 1):
        decord = backends.require("reading with backend=decord", "decord")
        self.path = path
        self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())

    def get(self, indices: list[int]) -> np.ndarray:
        """Source frame indices -> uint8 [len(indices), H, W, 3]."""
        batch = self._vr.get_batch(list(indices))
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # any decord bridge
        if frames.shape[0] != len(indices):
            raise VideoDecodeError(f"decord returned {frames.shape[0]} frames for {len(indices)} indices")
        return frames


class PyAVReader:
    """Seek + sequential decode through PyAV; frame i is the one whose timestamp is i / fps after the start."""

    backend = "pyav"

    def __init__(self, path: str, num_threads: int = 1):
        self.path, self.num_threads = path, num_threads
        with _av().open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise VideoDecodeError("unknown frame rate")
            self.fps = float(rate)
            self.height, self.width = stream.codec_context.height, stream.codec_context.width
            # Matroska/WebM headers carry no frame count: count the packets (demuxing only, no decoding).
            self.num_frames = int(stream.frames) or sum(1 for p in container.demux(stream) if p.size)

    def get(self, indices: list[int]) -> np.ndarray:
        """Source frame indices -> uint8 [len(indices), H, W, 3]."""
        wanted = sorted(set(int(i) for i in indices))
        if not wanted:
            raise ValueError("no frame indices")
        if wanted[0] < 0 or wanted[-1] >= self.num_frames:
            raise VideoDecodeError(f"frame indices {wanted[0]}..{wanted[-1]} outside 0..{self.num_frames - 1}")
        seek = wanted[0] > 0
        found, first_seen = self._decode(wanted, seek)
        if seek and first_seen is not None and first_seen > wanted[0]:  # the seek overshot: decode from the start
            found, _ = self._decode(wanted, seek=False)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise VideoDecodeError(
                f"frames {missing[:5]}{'...' if len(missing) > 5 else ''} could not be decoded (truncated file?)"
            )
        return np.stack([found[int(i)] for i in indices])

    def _decode(self, wanted: list[int], seek: bool) -> tuple[dict[int, np.ndarray], Optional[int]]:
        want, last = set(wanted), wanted[-1]
        found: dict[int, np.ndarray] = {}
        first_seen = None
        to_rgb = rgb24_converter(self.num_threads)
        with _av().open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.thread_count = self.num_threads
            time_base = stream.time_base or Fraction(1, 1)
            start = stream.start_time or 0
            if seek:
                # Half a frame early, so rounding never puts the target before the seek point.
                target = start + int((wanted[0] - 0.5) / self.fps / time_base)
                container.seek(max(target, start), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None:
                    continue
                index = int(round(float((pts - start) * time_base) * self.fps))
                if first_seen is None:
                    first_seen = index
                if index in want and index not in found:
                    found[index] = to_rgb(frame)
                if index >= last or len(found) == len(want):
                    break
        return found, first_seen


def open_video(path: str, backend: str = "auto", num_threads: int = 1):
    """A reader for path: DecordReader or PyAVReader. backend="auto" is decord when importable (and only that;
    use ``read_clip`` for the fall back on a failing file)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "decord" or (backend == "auto" and decord_available()):
        return DecordReader(path, num_threads)
    return PyAVReader(path, num_threads)


def _backend_order(backend: str) -> list[str]:
    """The backends read_clip tries, in order; MissingBackendError when auto finds neither package."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return [backend]
    order = (["decord"] if decord_available() else []) + (["pyav"] if backends.available("av") else [])
    if not order:
        backends.require("reading videos", "decord", "av")
    return order


def read_clip(
    path: str,
    pick: Callable[[int, float], list[int]],
    backend: str = "auto",
    num_threads: int = 1,
) -> tuple[np.ndarray, list[int], float]:
    """Decode the frames ``pick(num_frames, fps)`` chooses -> (uint8 [T, H, W, 3], indices, source fps).

    With backend="auto", a file decord cannot open or decode is tried again with PyAV. Raises
    VideoTooShortError (from pick; not retried: both backends would agree) or VideoDecodeError naming the file
    and what each backend said.
    """
    errors = []
    for name in _backend_order(backend):
        stderr = CapturedStderr()
        try:
            with stderr:
                reader = DecordReader(path, num_threads) if name == "decord" else PyAVReader(path, num_threads)
                indices = [int(i) for i in pick(reader.num_frames, reader.fps)]
                frames = reader.get(indices)
            if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
                raise VideoDecodeError(f"decoded frames have shape {frames.shape}")
            return frames, indices, reader.fps
        except VideoTooShortError as e:
            raise VideoTooShortError(f"{path}: {e}") from None
        except MissingBackendError:  # not the file's fault: it must not be skipped as a bad file
            raise
        except Exception as e:  # decord raises its own DECORDError, PyAV av.error.*; both are "this file is bad"
            said = stderr.summary()
            errors.append(f"{name}: {type(e).__name__}: {str(e).strip()[:300]}"
                          + (f" (decoder output: {said})" if said else ""))
    raise VideoDecodeError(f"cannot read {path}: " + " | ".join(errors))


def read_frames(path: str, indices: list[int], backend: str = "auto", num_threads: int = 1) -> np.ndarray:
    """Frames at the given source indices -> uint8 [len(indices), H, W, 3] (see read_clip)."""
    return read_clip(path, lambda n, fps: indices, backend, num_threads)[0]


def probe_video(path: str, decode_check: bool = True, backend: str = "auto") -> VideoInfo:
    """Frames, fps and size of a file, from its container metadata (PyAV). decode_check also decodes the first
    and the last frame (with ``backend``), which catches truncated files whose header promises more than is
    there. Raises VideoDecodeError."""
    stderr = CapturedStderr()
    try:
        with stderr:
            if backends.available("av"):
                reader = PyAVReader(path)
                height, width = reader.height, reader.width
            else:  # decord only: the size comes from the first frame
                reader = DecordReader(path)
                height, width = reader.get([0]).shape[1:3]
    except MissingBackendError:
        raise
    except Exception as e:
        said = stderr.summary()
        raise VideoDecodeError(f"cannot read {path}: {type(e).__name__}: {str(e).strip()[:300]}"
                               + (f" (decoder output: {said})" if said else "")) from None
    if reader.num_frames < 1:
        raise VideoDecodeError(f"{path}: no frames")
    info = VideoInfo(reader.num_frames, reader.fps, int(height), int(width))
    if decode_check:
        frames = read_frames(path, [0, info.num_frames - 1], backend)
        info.height, info.width = int(frames.shape[1]), int(frames.shape[2])
    return info


# ---------------------------------------------------------------------------------------------------------------
# Clip sampling
# ---------------------------------------------------------------------------------------------------------------


def clip_indices(
    num_available: int,
    video_fps: float,
    num_frames: int,
    *,
    fps: float = 0.0,
    stride: int = 1,
    start: str = "random",
    rng: np.random.Generator | None = None,
    window: tuple[Optional[float], Optional[float]] = (None, None),
) -> list[int]:
    """Source frame indices of one clip of num_frames frames.

    Spacing: with fps > 0, output frame k is the source frame nearest to time k / fps after the clip start
    (a 30 fps file read at fps=10 gives every third frame; fps above the source rate repeats frames); with fps=0,
    every ``stride``-th frame. window: (start, end) in seconds of the file that clips must lie in (None = the
    whole file). start: "random" (drawn from rng), "first" (the window's first frame) or "center".
    Raises VideoTooShortError when the window holds fewer frames than the clip spans.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if start not in CLIP_STARTS:
        raise ValueError(f"start must be one of {CLIP_STARTS}, got {start!r}")
    if fps > 0:
        if not video_fps or video_fps <= 0:
            raise VideoDecodeError("the file has no frame rate, so it cannot be read at a target fps")
        step = video_fps / fps
    else:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        step = float(stride)
    offsets = [int(math.floor(k * step + 0.5)) for k in range(num_frames)]
    span = offsets[-1] + 1

    lo, hi = 0, num_available  # [lo, hi): the frames the window allows
    w_start, w_end = window
    if w_start is not None and w_start > 0:
        lo = int(math.ceil(w_start * video_fps - 1e-6))
    if w_end is not None and w_end > 0:
        hi = min(hi, int(math.floor(w_end * video_fps + 1e-6)))
    room = hi - lo - span  # how far the clip's first frame can move
    if room < 0:
        raise VideoTooShortError(
            f"a clip of {num_frames} frames spans {span} source frames, but only {max(hi - lo, 0)} are available"
        )
    if start == "first":
        first = lo
    elif start == "center":
        first = lo + room // 2
    else:
        if rng is None:
            raise ValueError("start='random' needs a numpy Generator (seeded per sample, for determinism)")
        first = lo + int(rng.integers(0, room + 1))
    return [first + o for o in offsets]


# ---------------------------------------------------------------------------------------------------------------
