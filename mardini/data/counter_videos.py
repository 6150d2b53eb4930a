"""Small video files with a known content, for tests and benchmarks: each frame shows its own index.

Frame i of a counter video encodes i in binary as ``COUNTER_BITS`` horizontal bands (band b bright when bit b of
i is set, dark otherwise), over the whole width, so the index survives lossy codecs, scaling and the centre crop
of a wide frame (which removes columns only). ``frame_ids`` reads it back. Files are written by the ffmpeg
binary that imageio-ffmpeg ships (a subprocess), so writing never mixes FFmpeg builds with the decoders loaded in
this process.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

COUNTER_BITS = 6  # indices 0..63 are unique
CODECS = {".mp4": ("libx264", ["-crf", "12"]), ".webm": ("libvpx-vp9", ["-crf", "20", "-b:v", "0"]),
          ".mkv": ("libx264", ["-crf", "12"]), ".avi": ("mpeg4", ["-q:v", "2"]), ".mov": ("libx264", ["-crf", "12"])}


def counter_frame(i: int, height: int = 48, width: int = 64, texture: bool = False) -> np.ndarray:
    """uint8 [height, width, 3] showing index i as bands (see the module docstring).

    texture=True adds moving noise in the blue channel (realistic decoding cost for benchmarks; the bands, in
    red and green, still read back).
    """
    frame = np.full((height, width, 3), 24, np.uint8)
    bands = np.linspace(0, height, COUNTER_BITS + 1).round().astype(int)
    for b in range(COUNTER_BITS):
        if (i >> b) & 1:
            frame[bands[b] : bands[b + 1], :, :2] = 232
    if texture:
        rng = np.random.default_rng(1234)
        noise = rng.integers(0, 256, (height, width + 512), dtype=np.uint8)
        frame[:, :, 2] = noise[:, (7 * i) % 512 : (7 * i) % 512 + width]
    return frame


def frame_ids(frames: np.ndarray) -> list[int]:
    """Read the counters back: uint8 [T, H, W, 3] (or float [T, 3, H, W] in [-1, 1]) -> T indices."""
    x = np.asarray(frames)
    if x.dtype != np.uint8:  # float [T, 3, H, W] in [-1, 1]
        x = ((x.transpose(0, 2, 3, 1) + 1.0) * 127.5).clip(0, 255)
    height = x.shape[1]
    bands = np.linspace(0, height, COUNTER_BITS + 1)
    ids = []
    for frame in x:
        value = 0
        for b in range(COUNTER_BITS):
            lo, hi = bands[b], bands[b + 1]
            pad = (hi - lo) / 4  # read the middle of the band, away from blurred edges
            rows = frame[int(round(lo + pad)) : int(round(hi - pad)), :, :2]
            value |= int(rows.mean() > 128) << b
        ids.append(value)
    return ids


def write_test_video(
    path: str | os.PathLike,
    num_frames: int = 60,
    fps: float = 30,
    height: int = 48,
    width: int = 64,
    gop: int = 10,
    texture: bool = False,
) -> Path:
    """Write a counter video; the suffix picks the codec (.mp4/.mkv/.mov H.264, .webm VP9, .avi MPEG-4).

    gop: frames between keyframes (small, so that reading a clip exercises seeking).
    """
    import imageio_ffmpeg

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CODECS:
        raise ValueError(f"write_test_video: unsupported suffix {suffix!r}; use {sorted(CODECS)}")
    codec, params = CODECS[suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec=codec, pix_fmt_out="yuv420p", macro_block_size=1,
        ffmpeg_log_level="error", output_params=["-g", str(gop), *params],
    )
    writer.send(None)
    try:
        for i in range(num_frames):
            writer.send(np.ascontiguousarray(counter_frame(i, height, width, texture)))
    finally:
        writer.close()
    return path
