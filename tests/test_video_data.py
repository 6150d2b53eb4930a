"""Real video data: decoding (decord and PyAV), clip sampling, manifests, bad files, determinism across workers.

Test videos are counter videos (mardini/data/counter_videos.py): frame i shows i in binary as horizontal bands,
so every decoded frame says which source frame it is, through codec loss, resizing and cropping.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mardini.data.counter_videos import counter_frame, frame_ids, write_test_video
from mardini.data.manifest import Manifest, ManifestEntry, load_manifest, read_manifest, scan_folder, write_manifest
from mardini.data.transforms import crop_window, lowres_pixels, resize_crop
from mardini.data.video import (
    PyAVReader,
    SkipStats,
    TooManyFailuresError,
    VideoDataConfig,
    VideoDataset,
    VideoDecodeError,
    VideoTooShortError,
    clip_indices,
    decord_available,
    probe_video,
    read_clip,
    read_frames,
    read_video_config,
    skipped_paths,
)

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["decord", "pyav"] if decord_available() else ["pyav"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """mp4 and webm counter videos: 60 frames at 30 fps, 64x48 (keyframe every 10 frames)."""
    root = tmp_path_factory.mktemp("videos")
    return {s: str(write_test_video(root / f"counter{s}", num_frames=60, fps=30)) for s in (".mp4", ".webm")}


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    """Four good videos of different lengths, sizes and containers, one in a subfolder."""
    root = tmp_path_factory.mktemp("good")
    write_test_video(root / "a.mp4", num_frames=40, fps=30)
    write_test_video(root / "b.webm", num_frames=36, fps=24, height=40, width=72)
    write_test_video(root / "sub" / "c.mkv", num_frames=45, fps=30)
    write_test_video(root / "d.avi", num_frames=30, fps=25, height=40, width=40)
    return root


def bad_folder(base: Path, good_folder: Path) -> tuple[Path, list[str]]:
    """good_folder + one corrupt, one empty and one too-short file."""
    root = base / "mixed"
    shutil.copytree(good_folder, root)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (root / "empty.webm").write_bytes(b"")
    write_test_video(root / "short.mp4", num_frames=5, fps=30)
    bad = sorted(str(root / n) for n in ("corrupt.mp4", "empty.webm", "short.mp4"))
    return root, bad


def small_cfg(root, **kw) -> VideoDataConfig:
    base = dict(root=str(root), num_frames=4, height=32, width=32, fps=10.0, clip_start="random", crop="random",
                max_failure_fraction=0.9, min_failures=1000)
    base.update(kw)
    return VideoDataConfig(**base)


# ------------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoded_frames_match_written(videos, suffix, backend):
    frames = read_frames(videos[suffix], list(range(60)), backend=backend)
    assert frames.shape == (60, 48, 64, 3) and frames.dtype == np.uint8
    written = np.stack([counter_frame(i) for i in range(60)]).astype(np.float32)
    assert np.abs(frames.astype(np.float32) - written).mean() < 6  # codec tolerance
    assert frame_ids(frames) == list(range(60))


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_target_fps_and_stride(videos, suffix, backend):
    # a 30 fps file read at 10 fps gives every third frame; at stride 2, every second one
    pick10 = lambda n, fps: clip_indices(n, fps, 8, fps=10, start="first")  # noqa: E731
    frames, indices, fps = read_clip(videos[suffix], pick10, backend)
    assert fps == pytest.approx(30.0)
    assert indices == list(range(0, 24, 3)) and frame_ids(frames) == indices
    # a window starting at 1 s: the clip starts at frame 30
    pick_window = lambda n, fps: clip_indices(n, fps, 5, stride=2, start="first", window=(1.0, None))  # noqa: E731
    frames, indices, _ = read_clip(videos[suffix], pick_window, backend)
    assert frame_ids(frames) == indices == [30, 32, 34, 36, 38]


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_decord_and_pyav_agree(videos, suffix):
    if not decord_available():
        pytest.skip("decord is not installed")
    indices = [57, 3, 17, 18, 41, 3]  # unsorted, repeated, across keyframes
    a = read_frames(videos[suffix], indices, backend="decord")
    b = read_frames(videos[suffix], indices, backend="pyav")
    assert frame_ids(a) == frame_ids(b) == indices
    assert np.abs(a.astype(np.int16) - b).max() <= 2


def test_auto_backend_falls_back_to_pyav(videos, monkeypatch):
    import mardini.data.decode as video

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("decord cannot open this")

    monkeypatch.setattr(video, "DecordReader", Broken)
    monkeypatch.setattr(video, "decord_available", lambda: True)
    frames = read_frames(videos[".mp4"], [5, 6], backend="auto")
    assert frame_ids(frames) == [5, 6]
    with pytest.raises(VideoDecodeError, match="decord cannot open this"):
        read_frames(videos[".mp4"], [5], backend="decord")


def test_pyav_reader_counts_webm_frames_and_rejects_out_of_range(videos):
    reader = PyAVReader(videos[".webm"])  # WebM headers hold no frame count: it is counted
    assert reader.num_frames == 60 and reader.fps == pytest.approx(30.0)
    with pytest.raises(VideoDecodeError):
        reader.get([60])


def test_probe(videos, tmp_path):
    info = probe_video(videos[".webm"])
    assert (info.num_frames, info.height, info.width) == (60, 48, 64)
    assert info.fps == pytest.approx(30) and info.duration == pytest.approx(2.0)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty.mp4"):
        probe_video(str(tmp_path / "empty.mp4"))


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_files_are_decode_errors(tmp_path, faststart):
    import imageio_ffmpeg

    path = tmp_path / "full.mp4"
    params = ["-g", "10"] + (["-movflags", "+faststart"] if faststart else [])
    writer = imageio_ffmpeg.write_frames(str(path), (64, 48), fps=30, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=1, ffmpeg_log_level="error", output_params=params)
    writer.send(None)
    for i in range(60):
        writer.send(counter_frame(i))
    writer.close()
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])  # faststart: the header still promises all 60 frames
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        probe_video(str(cut))
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        read_frames(str(cut), [50, 53, 56])


# ------------------------------------------------------------------------------------------------ clip sampling


def test_clip_indices():
    assert clip_indices(100, 30, 4, fps=10, start="first") == [0, 3, 6, 9]
    assert clip_indices(100, 25, 5, fps=10, start="first") == [0, 3, 5, 8, 10]  # nearest frame to k / fps
    assert clip_indices(100, 30, 3, stride=4, start="first") == [0, 4, 8]
    assert clip_indices(20, 30, 3, stride=2, start="center") == [7, 9, 11]
    assert clip_indices(100, 10, 3, fps=20, start="first") == [0, 1, 1]  # above the source rate: repeats
    # window [1 s, 2 s) of a 30 fps file: frames 30..59
    for seed in range(20):
        idx = clip_indices(300, 30, 4, fps=10, rng=np.random.default_rng(seed), window=(1.0, 2.0))
        assert 30 <= idx[0] and idx[-1] <= 59 and np.diff(idx).tolist() == [3, 3, 3]
    a = clip_indices(300, 30, 4, rng=np.random.default_rng([0, 5]))
    assert a == clip_indices(300, 30, 4, rng=np.random.default_rng([0, 5]))  # seeded
    with pytest.raises(VideoTooShortError, match="spans 10"):
        clip_indices(9, 30, 4, fps=10)
    with pytest.raises(ValueError, match="Generator"):
        clip_indices(100, 30, 4)  # random start without a generator


def test_resize_crop_and_lowres():
    frames = np.stack([counter_frame(i, 48, 64) for i in range(3)])
    video = resize_crop(frames, 24, 24)
    assert video.shape == (3, 3, 24, 24) and video.dtype == torch.float32
    assert -1 <= video.min() and video.max() <= 1
    assert frame_ids(video.numpy()) == [0, 1, 2]
    assert crop_window((48, 64), (24, 24)) == (0, 8, 48, 48)  # short side kept whole, centred
    rng = np.random.default_rng(0)
    tops_lefts = {crop_window((48, 64), (24, 24), "random", rng)[:2] for _ in range(20)}
    assert len(tops_lefts) > 1 and all(t == 0 and 0 <= left <= 16 for t, left in tops_lefts)
    same = resize_crop(frames[:, :, 8:56], 48, 48)  # no resize needed: exact conversion
    torch.testing.assert_close(same, torch.from_numpy(frames[:, :, 8:56]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    lo = lowres_pixels(video[None], 4)
    assert lo.shape == (1, 3, 3, 6, 6)
    torch.testing.assert_close(lo[0, 0, 0, 0, 0], video[0, 0, :4, :4].mean())
    with pytest.raises(ValueError, match="divisible"):
        lowres_pixels(video, 5)


# ------------------------------------------------------------------------------------------------------ manifests


def test_scan_folder(good_folder, tmp_path):
    (good_folder / ".hidden.mp4").write_bytes(b"x")
    (good_folder / "notes.txt").write_text("not a video")
    try:
        found = [os.path.relpath(p, good_folder) for p in scan_folder(good_folder)]
        assert found == ["a.mp4", "b.webm", "d.avi", os.path.join("sub", "c.mkv")]
        assert [os.path.basename(p) for p in scan_folder(good_folder, ["webm"])] == ["b.webm"]
    finally:
        (good_folder / ".hidden.mp4").unlink()
        (good_folder / "notes.txt").unlink()


def test_manifest_files_and_windows(good_folder, tmp_path):
    rows = [{"path": str(good_folder / "a.mp4"), "start": 0.5, "end": 1.2},
            {"path": os.path.relpath(good_folder / "sub" / "c.mkv", tmp_path), "fps": 15}]
    for name in ("m.csv", "m.jsonl"):
        write_manifest(tmp_path / name, rows)
        entries = read_manifest(tmp_path / name)
        assert entries == [ManifestEntry(str(good_folder / "a.mp4"), 0.5, 1.2, None),
                           ManifestEntry(str(tmp_path / rows[1]["path"]), None, None, 15.0)]
        manifest = load_manifest(tmp_path / name)
        assert len(manifest) == 2 and list(manifest) == entries  # the compact form gives the entries back
    ds = VideoDataset(small_cfg(tmp_path / "m.csv", clip_start="random", crop="center"))
    for epoch in range(4):
        item = ds.get(0, epoch)  # a.mp4 between 0.5 s and 1.2 s at 10 fps: frames 15..35
        ids = frame_ids(item["video"].numpy())
        assert ids == item["frame_indices"].tolist() and ids[0] >= 15 and ids[-1] < 36
        assert np.diff(ids).tolist() == [3, 3, 3]
    item = ds[1]  # c.mkv read at its own 15 fps: every second frame
    assert np.diff(frame_ids(item["video"].numpy())).tolist() == [2, 2, 2] and item["clip_fps"] == 15
    (tmp_path / "bad.csv").write_text("file,start\nx.mp4,1\n")
    with pytest.raises(ValueError, match="'path' column"):
        read_manifest(tmp_path / "bad.csv")


def test_make_manifest_script(good_folder, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_manifest
    finally:
        sys.path.pop(0)
    root, bad = bad_folder(tmp_path, good_folder)
    out = tmp_path / "out" / "manifest.jsonl"
    good_rows, bad_rows = make_manifest.main([str(root), str(out), "--workers", "2", "--min-frames", "8", "--quiet"])
    assert sorted(r["path"] for r in bad_rows) == bad
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [os.path.basename(r["path"]) for r in lines] == ["a.mp4", "b.webm", "d.avi", "c.mkv"]
    assert lines[1] == {"path": str(root / "b.webm"), "num_frames": 36, "video_fps": 24.0, "height": 40,
                        "width": 72, "duration": 1.5}
    bad_listed = [json.loads(x) for x in (tmp_path / "out" / "manifest.bad.jsonl").read_text().splitlines()]
    assert {os.path.basename(r["path"]) for r in bad_listed} == {"corrupt.mp4", "empty.webm", "short.mp4"}
    assert any("too short" in r["error"] for r in bad_listed)
    assert len(VideoDataset(small_cfg(out))) == 4  # the manifest it wrote is readable
    # a source folder given relative to the working folder, the manifest written into another folder: readable
    # (the paths were once written relative to the working folder and read against the manifest's)
    cwd = os.getcwd()
    try:
        os.chdir(root.parent)
        make_manifest.main([root.name, "elsewhere/manifest.csv", "--workers", "1", "--min-frames", "8", "--quiet"])
    finally:
        os.chdir(cwd)
    elsewhere = VideoDataset(small_cfg(root.parent / "elsewhere" / "manifest.csv"))
    assert len(elsewhere) == 4 and all(elsewhere[i]["num_skipped"] == 0 for i in range(4))


def test_make_manifest_refuses_a_bad_output_or_source_before_probing(good_folder, tmp_path, monkeypatch, capsys):
    """A wrong output suffix was found after every video had been probed, and a missing source was reported as a
    suffix ''; both, and an unreadable manifest, are now one line and exit status 2 before any file is probed."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_manifest
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(make_manifest, "probe_files", lambda *a, **k: pytest.fail("probed before checking"))
    (tmp_path / "nopath.csv").write_text("file\nx.mp4\n")
    for args, message in (([good_folder, tmp_path / "man.txt"], "output " + str(tmp_path / "man.txt") +
                           ": a manifest's name ends in .csv or .jsonl (its format), not .txt"),
                          ([good_folder, "m.csv", "--bad", "bad.txt"], "--bad bad.txt: a manifest's name ends in"),
                          ([tmp_path / "nope", "m.csv"], f"source {tmp_path / 'nope'}: no such folder or manifest"),
                          ([good_folder / "a.mp4", "m.csv"], "give a folder of videos or a .csv or .jsonl manifest"),
                          ([tmp_path / "nopath.csv", "m.csv"], "the CSV header must have a 'path' column")):
        with pytest.raises(SystemExit) as exit_:
            make_manifest.main([*map(str, args), "--quiet"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("make_manifest.py: error: ") and message in err, (args, err)
    assert not (tmp_path / "man.txt").exists()


@pytest.mark.parametrize("split", ["train", "all"])
def test_a_missing_or_empty_video_folder_is_named_by_its_key(tmp_path, split, monkeypatch):
    """A relative data.video.root read from another working folder, or a folder without videos: the message names
    the key and says where it looked (it once said "no folder or manifest file at data/...", no key)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"data.video.root=data/clips: no folder or manifest file there "
                                                 rf"\(relative to the working folder {re.escape(str(tmp_path))}\); "
                                                 rf"without videos at hand, `python scripts/make_photo_corpus.py DIR`"):
        VideoDataset(VideoDataConfig(root="data/clips"), split=split)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data.video.root=empty holds no video files \(data.video.extensions: "):
        VideoDataset(VideoDataConfig(root="empty"), split=split)


# ------------------------------------------------------------------------------------------ the dataset, robustness


def test_dataset_items(good_folder):
    ds = VideoDataset(small_cfg(good_folder))
    assert len(ds) == 4
    for i in range(len(ds)):
        item = ds[i]
        assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
        assert item["index"] == item["source"] == i and item["skipped"] == "" and item["num_skipped"] == 0
        ids = frame_ids(item["video"].numpy())
        assert ids == item["frame_indices"].tolist()  # the frames are the ones it says
        assert item["clip_start"] == pytest.approx(ids[0] / {0: 30, 1: 24, 2: 25, 3: 30}[i])


def test_bad_files_are_skipped_counted_and_named(good_folder, tmp_path, caplog):
    root, bad = bad_folder(tmp_path, good_folder)
    ds = VideoDataset(small_cfg(root))
    assert len(ds) == 7
    stats = SkipStats(max_failure_fraction=0.9, min_failures=1000)
    loader = DataLoader(ds, batch_size=3, num_workers=2)
    seen_paths = []
    for batch in loader:
        assert batch["video"].shape[1:] == (4, 3, 32, 32)
        stats.update(batch)
        seen_paths += batch["path"]
        for video, indices in zip(batch["video"], batch["frame_indices"]):
            assert frame_ids(video.numpy()) == indices.tolist()  # a good clip
    assert not set(seen_paths) & set(bad)
    assert stats.loaded == 7 and stats.failed >= 3
    assert set(stats.paths) == set(bad)  # each bad file named
    assert stats.log_dict()["data/skipped_total"] == stats.failed
    # in-process loading logs a warning that names the file
    with caplog.at_level("WARNING", logger="mardini.data"):
        item = ds[[os.path.basename(p) for p in ds.manifest.paths].index("short.mp4")]
    assert skipped_paths(item)[0].endswith("short.mp4") and "short.mp4" in caplog.text
    assert item["path"] not in bad


def test_too_many_failures_raise_a_clear_error(good_folder, tmp_path):
    root, bad = bad_folder(tmp_path, good_folder)
    ds = VideoDataset(small_cfg(root, max_failure_fraction=0.1, min_failures=2))
    batches = iter(DataLoader(ds, batch_size=7, num_workers=2))
    message = ""
    try:
        for _ in batches:
            pass
    except TooManyFailuresError as e:  # raised in a worker, re-raised here
        message = str(e)
        # The re-raised exception's traceback holds the DataLoader iterator in a reference cycle; dropping it
        # lets `del` stop the workers now (at a later garbage collection the shutdown waits 5 s per worker).
        e.__traceback__ = None
    del batches
    assert re.search(r"video loads failed .*max_failure_fraction.*(corrupt|empty|short)", message), message
    # the main-process counter raises too, naming files
    stats = SkipStats(max_failure_fraction=0.1, min_failures=2)
    batch = {"video": torch.zeros(2, 4, 3, 8, 8), "skipped": [bad[0], f"{bad[1]}\n{bad[2]}"]}
    with pytest.raises(TooManyFailuresError, match="empty.webm"):
        stats.update(batch)
    # every attempt failing is an error as well
    only_bad = Manifest([ManifestEntry(p) for p in bad])
    ds = VideoDataset(small_cfg(root, max_attempts=3), manifest=only_bad)
    with pytest.raises(TooManyFailuresError, match="3 attempts failed") as err:
        ds[0]
    tried = str(err.value).split("; tried ")[1].split(", ")
    assert len(tried) == 3 == len(set(tried)), tried  # replacements once repeated a file already tried


def test_a_manifest_whose_files_are_missing_is_named_at_start(good_folder, tmp_path, caplog):
    """Paths read from the wrong folder used to pass the start-up and fail at the first batch."""
    good = sorted(str(p) for p in Path(good_folder).iterdir())
    write_manifest(tmp_path / "gone.csv", [{"path": f"clips/missing_{i}.mp4"} for i in range(3)])
    with pytest.raises(FileNotFoundError, match=r"data.video.root=.*gone.csv: none of the 3 video files looked for "
                                                r"exists \(e.g. .*clips/missing_0.mp4"):
        VideoDataset(small_cfg(str(tmp_path / "gone.csv")), split="train")
    write_manifest(tmp_path / "some.csv", [{"path": p} for p in good] + [{"path": str(tmp_path / "lost.mp4")}])
    with caplog.at_level("WARNING", logger="mardini.data"):
        ds = VideoDataset(small_cfg(str(tmp_path / "some.csv")))
    assert len(ds) == len(good) + 1
    assert f"1 of {len(good) + 1} video files looked for are missing (e.g. {tmp_path / 'lost.mp4'})" in caplog.text


def test_deterministic_per_index_with_workers(good_folder, tmp_path):
    root, _ = bad_folder(tmp_path, good_folder)  # replacements must be deterministic too
    ds = VideoDataset(small_cfg(root))
    order = [5, 2, 6, 0, 3, 1, 4]

    def run(workers):
        loader = DataLoader(ds, batch_size=2, sampler=order, num_workers=workers)
        return [b for b in loader]

    a, b = run(0), run(2)
    assert len(a) == len(b) == 4 and sum(len(x["path"]) for x in b) == len(order)  # every index, once per run
    for x, y in zip(a, b):
        assert torch.equal(x["video"], y["video"]) and x["path"] == y["path"] and x["skipped"] == y["skipped"]
        assert torch.equal(x["frame_indices"], y["frame_indices"])
    assert torch.equal(ds[3]["video"], ds[3]["video"])
    assert not torch.equal(ds.get(3, epoch=0)["frame_indices"], ds.get(3, epoch=1)["frame_indices"]) or \
        not torch.equal(ds.get(3, epoch=0)["video"], ds.get(3, epoch=1)["video"])


def test_workers_forked_after_the_parent_decoded_with_pyav_still_decode(good_folder):
    """PyAV (>= 17) caches a frame scaler per thread whose slice threads a forked DataLoader worker inherits without
    the threads: a worker started after the main process had decoded a clip hung at its first frame, forever."""
    ds = VideoDataset(small_cfg(good_folder, backend="pyav"))
    in_process = ds[1]["video"]  # the main process converts frames first (as validation or a probe would)
    loader = DataLoader(ds, batch_size=1, sampler=[1], num_workers=1, timeout=60)  # a hang raises after 60 s
    assert torch.equal(next(iter(loader))["video"][0], in_process)


def _read_all_frames_into(path, queue):
    from mardini.evaluation.data import _read_all_pyav

    queue.put(_read_all_pyav(Path(path)))


def test_evaluation_reads_videos_in_a_process_forked_after_a_pyav_decode(videos):
    import multiprocessing
    import queue as queues

    from mardini.evaluation.data import _read_all_pyav

    expected = _read_all_pyav(Path(videos[".mp4"]))  # the parent converts frames first
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_read_all_frames_into, args=(videos[".mp4"], results))
    child.start()
    try:
        frames = results.get(timeout=60)
    except queues.Empty:
        frames = None
    finally:
        child.kill()
        child.join()
    assert frames is not None, "the forked process did not decode the video within 60 s (hung)"
    np.testing.assert_array_equal(frames, expected)


def test_config_checks(good_folder):
    with pytest.raises(ValueError, match="data.video.clip_start"):
        read_video_config({"root": str(good_folder), "clip_start": "middle"})
    with pytest.raises(ValueError, match="unknown keys"):
        read_video_config({"root": str(good_folder), "frames": 3})
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(VideoDataConfig(root=str(good_folder), num_frames=3))
    assert read_video_config(cfg).num_frames == 3 and read_video_config(cfg).extensions[0] == ".mp4"
    with pytest.raises(ValueError, match="holds no video files"):
        VideoDataset(small_cfg(good_folder, extensions=[".flv"]))
