"""Writing videos: sample previews for logs and files for evaluation. (Reading lives in decode.py.)

Every writer renders into a temporary name in the destination folder and then renames it into place with
``os.replace``, so a crash or a kill never leaves a half-written file where a finished one is expected.
mp4 is encoded by the ffmpeg binary of imageio-ffmpeg when installed, else in-process by PyAV; both are imported
only when an mp4 is written (see backends.py), and ``check_output`` says before any work whether a path can be
written.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from . import backends

VIDEO_SUFFIXES = (".mp4", ".gif")
GIVEN_BORDER_COLOR = (0.15, 0.85, 0.25)  # RGB in [0, 1]: outlines reference frames in make_grid_video
OTHER_BORDER_COLOR = (0.0, 0.0, 0.0)  # RGB in [0, 1]: the border of generated frames
_FRAME_NAME = "{:06d}.png"


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """[T, 3, H, W] float in [-1, 1] -> uint8 [T, H, W, 3] (values outside [-1, 1] are clamped)."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"video must be [T, 3, H, W], got shape {tuple(video.shape)}")
    x = ((video.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return rearrange(x, "t c h w -> t h w c").numpy()


def _as_uint8_frames(frames: np.ndarray | Tensor) -> np.ndarray:
    """Accept either form write_video takes and return contiguous uint8 [T, H, W, 3]."""
    if isinstance(frames, Tensor):
        return np.ascontiguousarray(to_uint8_frames(frames))
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be a uint8 [T, H, W, 3] array or a [T, 3, H, W] float tensor, "
            f"got {frames.dtype} array of shape {frames.shape}"
        )
    return np.ascontiguousarray(frames)


def _is_frame_folder(path: str | os.PathLike) -> bool:
    """A path ending in a separator, or without a suffix, names a folder of PNG frames."""
    text = os.fspath(path)
    return text.endswith(("/", os.sep)) or Path(text).suffix == ""


def check_output(path: str | os.PathLike) -> None:
    """Raise, naming the path, if write_video could not write it: an unknown suffix, no mp4 encoder installed,
    or a destination folder that cannot be created or written. Writes nothing."""
    as_folder = _is_frame_folder(path)
    path = Path(path)
    if not as_folder and path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use {' or '.join(VIDEO_SUFFIXES)}, or a "
                         f"folder (no suffix) for PNG frames")
    if not as_folder and path.suffix.lower() == ".mp4":
        backends.require(f"writing {path.name}", "imageio_ffmpeg", "av")
    if path.is_dir() and not as_folder:
        raise IsADirectoryError(f"{path} is a folder; name a file ending in {' or '.join(VIDEO_SUFFIXES)}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: {folder} is not a writable folder")


def write_video(path: str | os.PathLike, frames: np.ndarray | Tensor, fps: int = 8) -> Path:
    """Write frames (uint8 [T, H, W, 3], or a [T, 3, H, W] tensor in [-1, 1]) to path; return the final path.

    The suffix picks the format: ``.mp4`` (H.264, yuv420p, crf 18), ``.gif``, or a folder of PNG frames
    ``000000.png, 000001.png, ...`` (path ending in '/' or without a suffix). yuv420p needs even sizes, so an
    mp4 of odd height or width is padded by one repeated row or column at the bottom or right.
    """
    frames = _as_uint8_frames(frames)
    if frames.shape[0] == 0:
        raise ValueError("write_video: no frames to write")
    if fps <= 0:
        raise ValueError(f"write_video: fps must be positive, got {fps}")
    as_folder = _is_frame_folder(path)
    path = Path(path)
    suffix = path.suffix.lower()
    if not as_folder and suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"write_video: unsupported suffix {path.suffix!r} in {path}; use {VIDEO_SUFFIXES} or a folder"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_folder:
        _write_png_folder(path, frames)
        return path

    # The temporary name keeps the suffix, so ffmpeg and imageio choose the same container.
    tmp_name = _temporary_name(path, suffix)
    try:
        if suffix == ".mp4":
            _write_mp4(tmp_name, frames, fps)
        else:
            import imageio.v3 as iio

            iio.imwrite(tmp_name, frames, extension=".gif", duration=1000.0 / fps, loop=0)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _temporary_name(path: Path, suffix: str) -> str:
    """A hidden, unique name beside path (same filesystem, so os.replace is atomic); nothing is created."""
    return str(path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"))


def _write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    """H.264 in yuv420p, which players everywhere accept; odd sizes padded to even by edge repetition."""
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    encoder = backends.require("writing mp4 videos", "imageio_ffmpeg", "av")
    if encoder.__name__ == "av":
        _write_mp4_pyav(encoder, path, frames, fps)
        return
    writer = encoder.write_frames(
        path,
        (frames.shape[2], frames.shape[1]),  # (width, height)
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,  # set the rate factor directly below instead
        macro_block_size=1,  # no resizing of small frames such as 32x32
        output_params=["-crf", "18"],
        ffmpeg_log_level="error",
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def _write_mp4_pyav(av, path: str, frames: np.ndarray, fps: int) -> None:
    """The same H.264 / yuv420p / crf 18 encoding in-process, for machines without imageio-ffmpeg."""
    from fractions import Fraction

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_png_folder(path: Path, frames: np.ndarray) -> None:
    """Write the frames into a temporary folder beside path, then rename it into place.

    An existing folder is replaced only when it holds nothing but numbered PNG frames (an earlier output),
    so a mistyped path never deletes someone's files.
    """
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"write_video: {path} exists and is not a folder")
        foreign = [p.name for p in path.iterdir() if not (p.suffix == ".png" and p.stem.isdigit())]
        if foreign:
            raise FileExistsError(f"write_video: {path} holds files other than PNG frames: {foreign[:5]}")
    import imageio.v3 as iio

    tmp = Path(_temporary_name(path, ""))
    tmp.mkdir()
    old = None
    try:
        for i, frame in enumerate(frames):
            iio.imwrite(tmp / _FRAME_NAME.format(i), frame, extension=".png")
        if path.exists():
            old = tmp.with_name(f"{tmp.name}.old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous frames back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_grid_video(videos: list[Tensor], given: list[Tensor] | None = None, border: int = 2) -> Tensor:
    """Place videos side by side for a preview, outlining given (reference) frames in colour.

    videos: each [T, 3, H, W] in [-1, 1], same T and H (widths may differ). given: one [T] bool per video
    (True = the frame was given to the model), or None. Every video gets a ``border``-pixel frame: green
    (GIVEN_BORDER_COLOR) on given frames, black otherwise. Returns [T, 3, H + 2b, sum(W_i + 2b)].
    """
    if len(videos) == 0:
        raise ValueError("make_grid_video: no videos")
    if given is not None and len(given) != len(videos):
        raise ValueError(f"make_grid_video: {len(given)} given masks for {len(videos)} videos")
    t, _, h, _ = videos[0].shape
    for v in videos:
        if v.ndim != 4 or v.shape[0] != t or v.shape[1] != 3 or v.shape[2] != h:
            shapes = [tuple(x.shape) for x in videos]
            raise ValueError(f"make_grid_video: videos must be [T, 3, H, W] with equal T and H, got {shapes}")
    device = videos[0].device
    given_color = torch.tensor(GIVEN_BORDER_COLOR, device=device) * 2 - 1  # [3], in [-1, 1]
    other_color = torch.tensor(OTHER_BORDER_COLOR, device=device) * 2 - 1

    panels = []
    for i, v in enumerate(videos):
        w = v.shape[-1]
        mask = torch.zeros(t, dtype=torch.bool, device=device)
        if given is not None and given[i] is not None:
            mask = torch.as_tensor(given[i], dtype=torch.bool, device=device).reshape(t)
        color = torch.where(mask[:, None], given_color, other_color)  # [T, 3]
        panel = color[:, :, None, None].expand(t, 3, h + 2 * border, w + 2 * border).clone()
        panel[:, :, border : border + h, border : border + w] = v.to(device=device, dtype=panel.dtype)
        panels.append(panel)
    return torch.cat(panels, dim=-1)
