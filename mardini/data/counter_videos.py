"""Small video files with a known content, for tests and benchmarks: each frame shows its own index.

Frame i of a counter video encodes i in binary as ``COUNTER_BITS`` horizontal bands (band b bright when bit b of
i is set, dark otherwise), over the whole width, so the index survives lossy codecs, scaling and the centre crop
of a wide frame (which removes columns only). ``frame_ids`` reads it back. Files are written by the ffmpeg
binary that imageio-ffmpeg ships (a subprocess), so writing never mixes FFmpeg builds with the decoders loaded in
this process; without imageio-ffmpeg, PyAV encodes them in-process.
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

    texture=True fills the blue channel with moving waves plus mild grain, which costs about what real footage
    costs to encode and decode (for benchmarks); the bands, in red and green, still read back.
    """
    frame = np.full((height, width, 3), 24, np.uint8)
    bands = np.linspace(0, height, COUNTER_BITS + 1).round().astype(int)
    for b in range(COUNTER_BITS):
        if (i >> b) & 1:
            frame[bands[b] : bands[b + 1], :, :2] = 232
    if texture:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        waves = np.sin(x / 11.0 + 0.25 * i) * np.cos(y / 17.0 - 0.15 * i) + 0.5 * np.sin((x + y) / 29.0 + 0.1 * i)
        grain = np.random.default_rng(i).normal(0.0, 6.0, (height, width))
        frame[:, :, 2] = np.clip(128 + 80 * waves + grain, 0, 255).astype(np.uint8)
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
    crf: int | None = None,
) -> Path:
    """Write a counter video; the suffix picks the codec (.mp4/.mkv/.mov H.264, .webm VP9, .avi MPEG-4).

    gop: frames between keyframes (small, so that reading a clip exercises seeking). crf: the H.264 / VP9 rate
    factor (default: near-lossless 12 / 20; 23 is x264's usual default).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CODECS:
        raise ValueError(f"write_test_video: unsupported suffix {suffix!r}; use {sorted(CODECS)}")
    codec, params = CODECS[suffix]
    if crf is not None and "-crf" in params:
        params = [str(crf) if k > 0 and params[k - 1] == "-crf" else v for k, v in enumerate(params)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = (counter_frame(i, height, width, texture) for i in range(num_frames))
    try:
        import imageio_ffmpeg
    except ImportError:  # no ffmpeg binary: encode in-process with PyAV (H.264 / VP9 / MPEG-4 as above)
        _write_pyav(path, frames, fps, codec, gop, params)
        return path
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec=codec, pix_fmt_out="yuv420p", macro_block_size=1,
        ffmpeg_log_level="error", output_params=["-g", str(gop), *params],
    )
    writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()
    return path


def _write_pyav(path: Path, frames, fps: float, codec: str, gop: int, params: list[str]) -> None:
    from fractions import Fraction

    import av

    options = {params[k].lstrip("-").replace(":v", ""): params[k + 1] for k in range(0, len(params), 2)}
    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.gop_size = gop
                stream.options = {k: v for k, v in options.items() if k in ("crf", "b", "q")}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
