"""The photo-motion corpus: real photographs in smooth motion, a fixed photo split, files the real reader decodes."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from mardini.data import photo_motion as pm

ROOT = Path(__file__).resolve().parent.parent
CAMERA_MOTIONS = ("pan", "zoom", "rotate", "combo")


def _script():
    spec = importlib.util.spec_from_file_location("make_photo_corpus", ROOT / "scripts" / "make_photo_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _camera(num_frames: int, step=(0.0, 0.0), zoom=1.0, centre=(0.0, 0.0), scale=1.0) -> pm.Camera:
    t = np.arange(num_frames, dtype=np.float64)
    shift = np.stack([step[0] * t, step[1] * t], axis=-1)
    return pm.Camera(shift=shift, zoom=np.full(num_frames, zoom), angle=np.zeros(num_frames), centre=centre,
                     scale=scale)


def test_same_seed_same_frames():
    a = pm.render_clip(0, 5, "train", 24, 32, 6)
    pm.render_clip(0, 2, "val", 24, 32, 6)  # other clips in between change nothing
    b = pm.render_clip(0, 5, "train", 24, 32, 6)
    assert a.frames.shape == (6, 24, 32, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames) and a.photos == b.photos and a.motion == b.motion
    assert not np.array_equal(a.frames, pm.render_clip(1, 5, "train", 24, 32, 6).frames)
    assert not np.array_equal(a.frames, pm.render_clip(0, 6, "train", 24, 32, 6).frames)


def test_validation_photos_never_in_training_clips():
    assert not set(pm.TRAIN_PHOTOS) & set(pm.VAL_PHOTOS)
    # Disjoint by content too (skimage.data.cat() is chelsea(): only one of the two names may be listed).
    photos = {name: pm.load_photo(name) for name in pm.TRAIN_PHOTOS + pm.VAL_PHOTOS}
    for v in pm.VAL_PHOTOS:
        for t in pm.TRAIN_PHOTOS:
            assert photos[v].shape != photos[t].shape or not np.array_equal(photos[v], photos[t]), (v, t)
    seen = {"train": set(), "val": set()}
    layered = 0
    for split in seen:
        for i in range(40):
            clip = pm.render_clip(3, i, split, 16, 16, 2)
            seen[split].update(clip.photos)
            layered += len(clip.photos) > 1
    assert seen["train"] <= set(pm.TRAIN_PHOTOS) and seen["val"] <= set(pm.VAL_PHOTOS)
    assert layered > 0, "no clip with a cut-out layer was drawn: the layer photos went unchecked"


def test_pure_pan_shows_shifted_crops_of_the_photo():
    photo = np.random.default_rng(0).integers(0, 256, size=(64, 80, 3)).astype(np.uint8)
    h, w, dx, dy = 16, 20, 2, 1
    # Output pixel (j, i) shows photo (cx + dx*k + j - (w-1)/2, cy + dy*k + i - (h-1)/2): integers for this centre.
    cx, cy, x0, y0 = 10 + (w - 1) / 2, 5 + (h - 1) / 2, 10, 5
    frames = _camera(8, step=(dx, dy), centre=(cx, cy)).render(pm.Mipmap(photo), h, w)
    for k in range(8):
        crop = photo[y0 + dy * k : y0 + dy * k + h, x0 + dx * k : x0 + dx * k + w]
        np.testing.assert_allclose(frames[k], crop, atol=1e-3)


def test_zooming_out_is_antialiased():
    checker = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    photo = np.repeat(checker[..., None], 3, axis=-1)  # one-pixel checkerboard: pure aliasing bait
    for scale in (2.8, 3.3):
        frames = _camera(2, centre=(128.3, 127.8), scale=scale).render(pm.Mipmap(photo), 32, 32)
        assert abs(frames.mean() - 127.5) < 3 and frames.std() < 6, (scale, frames.std())


def test_camera_motion_is_smooth_and_nontrivial():
    checked = 0
    for i in range(12):
        clip = pm.render_clip(0, i, "train", 32, 32, 16)
        if clip.motion not in CAMERA_MOTIONS:
            continue
        diff = np.abs(np.diff(clip.frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # [T - 1]
        assert diff.min() > 0.2, (i, clip.motion, diff)  # every frame moves
        assert diff.max() < 2.0 * np.median(diff), (i, clip.motion, diff)  # no jumps: steady or gently eased
        checked += 1
    assert checked >= 4


def test_script_writes_files_the_reader_decodes_and_refuses_to_overwrite(tmp_path):
    from mardini.data.video import VideoDataset

    script, out = _script(), tmp_path / "corpus"
    args = [str(out), "--num-train", "3", "--num-val", "2", "--size", "48", "--frames", "12", "--quiet"]
    summary = script.main(args)
    assert summary["train"] == 3 and summary["bytes"] > 0
    rows = {s: list(csv.DictReader(open(out / f"{s}.csv"))) for s in ("train", "val")}
    assert [r["path"] for r in rows["train"]] == [f"train/{i:06d}.mp4" for i in range(3)]
    assert all(r["photo"] in pm.VAL_PHOTOS for r in rows["val"])
    assert "fps" not in rows["train"][0]  # a manifest 'fps' column would override the sampling rate

    cfg = {"root": str(out / "train.csv"), "num_frames": 9, "height": 32, "width": 32, "fps": 8.0,
           "clip_start": "first"}
    data = VideoDataset(cfg)
    item = data[1]
    assert len(data) == 3 and tuple(item["video"].shape) == (9, 3, 32, 32)
    assert Path(item["path"]).resolve() == (out / "train" / "000001.mp4").resolve()
    # The decoded pixels are the rendered ones (after the codec and the reader's resize to 32x32).
    clip = pm.render_clip(0, 1, "train", 48, 48, 12)
    import torch

    truth = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float()
    truth = torch.nn.functional.interpolate(truth, size=(32, 32), mode="bilinear", antialias=True) / 127.5 - 1
    mse = ((item["video"] - truth[:9]) ** 2).mean().item() / 4  # on a [0, 1] scale
    assert 10 * np.log10(1 / mse) > 40  # about 48 dB; a clip one frame late is about 43, another clip about 12
    # each decoded frame is closest to its own rendered frame: written and read at 8 fps, none shifted or repeated
    errors = ((item["video"][:, None] - truth[None]) ** 2).mean(dim=(2, 3, 4))  # [9 decoded, 12 rendered]
    assert errors.argmin(dim=1).tolist() == list(range(9))

    with pytest.raises(SystemExit, match="not empty"):
        script.main(args)
    (out / "notes.txt").write_text("keep me")
    script.main([str(out), "--num-train", "1", "--num-val", "1", "--size", "32", "--frames", "4", "--quiet",
                 "--overwrite"])
    assert len(list(csv.DictReader(open(out / "train.csv")))) == 1
    assert not (out / "train" / "000002.mp4").exists() and (out / "notes.txt").read_text() == "keep me"
