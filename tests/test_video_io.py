"""Writing videos: formats round-trip, writes are atomic, grids outline the given frames."""

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch

import mardini.data.video_io as video_io
from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
from mardini.data.video_io import make_grid_video, to_uint8_frames, write_video

from helpers_video import nearest_frames


def clip(t=9, h=32, w=32, index=0) -> torch.Tensor:
    return SyntheticVideoDataset(SyntheticVideoConfig(num_frames=t, height=h, width=w))[index]["video"]


def read_mp4(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_to_uint8_frames():
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(4, 1, 1, 1).expand(4, 3, 2, 2)
    frames = to_uint8_frames(video)
    assert frames.dtype == np.uint8 and frames.shape == (4, 2, 2, 3)
    assert frames[:, 0, 0, 0].tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("h,w", [(32, 32), (33, 31)])
def test_mp4_round_trip(tmp_path, h, w):
    video = clip(h=h, w=w)
    out = write_video(tmp_path / "clip.mp4", video, fps=12)
    assert out == tmp_path / "clip.mp4"
    frames = read_mp4(out)
    # yuv420p needs even sizes: odd ones come back padded by one row / column
    assert frames.shape == (9, h + h % 2, w + w % 2, 3)
    error = np.abs(frames[:, :h, :w].astype(np.float32) - to_uint8_frames(video)).mean()
    assert error < 10, error
    assert nearest_frames(frames[:, :h, :w], to_uint8_frames(video))[0] == list(range(9))  # in order, none repeated
    with av.open(str(out)) as container:
        assert container.streams.video[0].average_rate == 12
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left


def test_gif_round_trip(tmp_path):
    frames = to_uint8_frames(clip())
    out = write_video(tmp_path / "clip.gif", frames, fps=5)
    back = iio.imread(out, index=None)[..., :3]
    assert back.shape == frames.shape
    assert np.abs(back.astype(np.float32) - frames).mean() < 10  # palette quantisation
    assert nearest_frames(back, frames)[0] == list(range(9))
    assert iio.immeta(out, index=None)["duration"] == 200  # ms per frame at 5 fps
    assert [p.name for p in tmp_path.iterdir()] == ["clip.gif"]


@pytest.mark.parametrize("name", ["frames/", "frames"])
def test_png_folder_exact_and_overwrite(tmp_path, name):
    frames = to_uint8_frames(clip(t=4, h=17, w=23))
    out = write_video(str(tmp_path / name), frames)
    assert out == tmp_path / "frames"
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(4)]
    back = np.stack([iio.imread(out / f"{i:06d}.png") for i in range(4)])
    assert np.array_equal(back, frames)
    # writing again (fewer frames) replaces the folder; a folder with other files is refused
    write_video(out, frames[:2])
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_video(out, frames)


def test_crash_leaves_previous_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "clip.mp4"
    write_video(target, clip())
    before = target.read_bytes()

    def broken_writer(path, frames, fps):
        with open(path, "wb") as f:
            f.write(b"half a video")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(video_io, "_write_mp4", broken_writer)
    with pytest.raises(RuntimeError):
        write_video(target, clip(index=1))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "clip.avi", clip())
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "clip.mp4", np.zeros((2, 8, 8, 3), np.float32))


def test_grid_video_outlines_given_frames_only():
    t, h, b = 5, 16, 2
    videos = [clip(t=t, h=h, w=16), clip(t=t, h=h, w=24, index=1)]
    given = [torch.tensor([True, False, False, False, True]), torch.tensor([True, True, False, False, False])]
    grid = make_grid_video(videos, given, border=b)
    assert grid.shape == (t, 3, h + 2 * b, (16 + 2 * b) + (24 + 2 * b))
    green = torch.tensor(video_io.GIVEN_BORDER_COLOR) * 2 - 1
    for i, (start, width) in enumerate([(0, 16), (16 + 2 * b, 24)]):
        panel = grid[..., start : start + width + 2 * b]
        assert torch.equal(panel[:, :, b : b + h, b : b + width], videos[i])
        top_edge = panel[:, :, 0, :]  # [T, 3, W + 2b]
        is_green = (top_edge == green[None, :, None]).all(dim=1).all(dim=-1)  # [T]
        assert is_green.tolist() == given[i].tolist()
        assert (panel[~given[i], :, :b] == -1).all()  # other frames get a black border
    plain = make_grid_video(videos, None, border=0)
    assert torch.equal(plain, torch.cat(videos, dim=-1))
