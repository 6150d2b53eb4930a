"""Validation data is held out: with data=video whole files (data.video.val_root, or a hashed data.video.val_fraction
of data.video.root), with data=cache the clips of held-out source files (or data.val_cache_dir); training never
reads them, validation reads only them, and the run's log says what is held out. Synthetic data stays
seed-disjoint (tests/test_training.py::test_validation_clips_follow_data_config_and_val_seed).

Every test video here is one flat grey level, distinct per file, so a clip's mean names the file it came from.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers_training import tiny_config
from mardini.autoencoders import build_autoencoder
from mardini.data.latent_cache import build_latent_cache, split_cache
from mardini.data.manifest import write_manifest
from mardini.data.video import VideoDataConfig, VideoDataset, held_out, split_key, split_manifests
from mardini.data.video_io import write_video
from mardini.training.trainer import Trainer

NUM_FILES = 24


def level_of(index: int) -> int:
    return 20 + 8 * index  # grey level of file i (0..255), far apart enough to survive H.264


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("grey")
    for i in range(NUM_FILES):
        frames = np.full((12, 32, 32, 3), level_of(i), dtype=np.uint8)
        write_video(root / f"v{i:02d}.mp4", frames, fps=8)
    return root


def file_of(clip: torch.Tensor) -> int:
    """The file a clip [T, 3, H, W] in [-1, 1] was read from, by its grey level."""
    level = float((clip.float().mean() + 1) * 127.5)
    return int(round((level - 20) / 8))


def video_cfg(root, **kw) -> dict:
    return dict(dict(root=str(root), num_frames=9, height=32, width=32, fps=0.0, frame_stride=1), **kw)


def test_held_out_files_are_deterministic_disjoint_and_stable(tmp_path):
    keys = [f"clips/v{i:04d}.mp4" for i in range(400)]
    chosen = held_out(keys, 0.05)
    assert 8 <= len(chosen) <= 32, len(chosen)  # about 5 % (20 expected)
    assert held_out(list(reversed(keys)), 0.05) == sorted(len(keys) - 1 - i for i in chosen)  # order-free
    more = keys + [f"clips/new{i}.mp4" for i in range(100)]
    assert {keys[i] for i in chosen} <= {more[i] for i in held_out(more, 0.05)}  # adding files keeps them out
    assert len(held_out(keys[:3], 0.05)) == 1  # at least one file, even when the fraction rounds to none
    # the key is the path relative to the root (folder, or a manifest's folder): a moved dataset keeps its split
    (tmp_path / "a").mkdir()
    assert split_key(str(tmp_path / "a" / "x.mp4"), str(tmp_path / "a")) == "x.mp4"
    assert split_key(str(tmp_path / "a" / "x.mp4"), str(tmp_path / "a" / "m.csv")) == "x.mp4"


def test_split_manifests_folder_and_val_root(grey_folder, tmp_path):
    train, val, note = split_manifests(VideoDataConfig(**video_cfg(grey_folder, val_fraction=0.2)))
    assert len(val) >= 1 and len(train) + len(val) == NUM_FILES
    assert not set(train.paths) & set(val.paths)
    assert "held out" in note and "data.video.val_fraction=0.2" in note
    # a separate validation manifest: all of root trains, all of val_root validates; overlaps are refused
    write_manifest(tmp_path / "train.csv", [{"path": p} for p in train.paths])
    write_manifest(tmp_path / "val.csv", [{"path": p} for p in val.paths])
    t2, v2, note2 = split_manifests(VideoDataConfig(**video_cfg(tmp_path / "train.csv",
                                                                val_root=str(tmp_path / "val.csv"))))
    assert t2.paths == train.paths and v2.paths == val.paths and "data.video.val_root" in note2
    with pytest.raises(ValueError, match=r"data\.video\.val_root=.*shares 1 files with data\.video\.root"):
        write_manifest(tmp_path / "bad_val.csv", [{"path": train.paths[0]}])
        split_manifests(VideoDataConfig(**video_cfg(tmp_path / "train.csv", val_root=str(tmp_path / "bad_val.csv"))))
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(train.paths[0], one / "only.mp4")
    with pytest.raises(ValueError, match=r"data\.video\.root=.*has 1 file.*data\.video\.val_root"):
        split_manifests(VideoDataConfig(**video_cfg(one)))
    with pytest.raises(ValueError, match=r"data\.video\.val_fraction"):
        VideoDataset(VideoDataConfig(**video_cfg(grey_folder, val_fraction=0.0)), split="train")
    # the library's default reads every file (tools such as scripts/cache_latents.py)
    assert len(VideoDataset(VideoDataConfig(**video_cfg(grey_folder)))) == NUM_FILES


def video_run_config(out, root, **video):
    cfg = tiny_config(out, max_steps=1, num_sample_videos=6)
    cfg.data.source = "video"
    cfg.data.video = OmegaConf.merge(cfg.data.video, video_cfg(root, **video))
    return cfg


def test_video_training_never_reads_validation_files(grey_folder, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        trainer = Trainer(video_run_config(tmp_path / "run", grey_folder, val_fraction=0.15))
    val_files = {int(p[-6:-4]) for p in trainer.val_dataset.manifest.paths}
    train_files = {int(p[-6:-4]) for p in trainer.dataset.manifest.paths}
    assert val_files and not val_files & train_files and len(val_files | train_files) == NUM_FILES
    # what training reads (every item of its dataset) and what validation reads, told apart by content
    assert {file_of(trainer.dataset[i]["video"]) for i in range(len(trainer.dataset))} == train_files
    clips = trainer.validation_clips(6)
    assert clips.shape[0] == 6 and {file_of(c) for c in clips} <= val_files
    assert any("held out" in r.getMessage() and "never trained on" in r.getMessage() for r in caplog.records)


def test_video_training_with_a_validation_manifest(grey_folder, tmp_path):
    paths = sorted(str(p) for p in grey_folder.glob("*.mp4"))
    write_manifest(tmp_path / "train.csv", [{"path": p} for p in paths[:20]])
    write_manifest(tmp_path / "val.csv", [{"path": p} for p in paths[20:]])
    trainer = Trainer(video_run_config(tmp_path / "run", tmp_path / "train.csv", val_root=str(tmp_path / "val.csv")))
    assert len(trainer.dataset) == 20
    assert {file_of(c) for c in trainer.validation_clips(6)} <= {20, 21, 22, 23}


def test_cache_training_never_reads_held_out_clips(grey_folder, tmp_path, caplog):
    ae = build_autoencoder("identity", patch_size=2)
    dataset = VideoDataset(VideoDataConfig(**video_cfg(grey_folder)))
    build_latent_cache(tmp_path / "cache", dataset, ae, lowres_factor=2, dtype="float32", progress=False)
    cfg = tiny_config(tmp_path / "run", max_steps=1, num_sample_videos=4)
    cfg.data.source, cfg.data.cache_dir = "cache", str(tmp_path / "cache")
    cfg.data.video.val_fraction = 0.15
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        trainer = Trainer(cfg)
    # the same files are held out as with data=video on this folder
    _, val_manifest, _ = split_manifests(VideoDataConfig(**video_cfg(grey_folder, val_fraction=0.15)))
    expected_val = {int(p[-6:-4]) for p in val_manifest.paths}
    decode = lambda z: ae.decode(z[None])[0]  # noqa: E731
    train_files = {file_of(decode(trainer.dataset[i]["z_hi"])) for i in range(len(trainer.dataset))}
    assert train_files == set(range(NUM_FILES)) - expected_val
    assert {file_of(c) for c in trainer.validation_clips(4)} <= expected_val
    assert any("cached clips" in r.getMessage() and "held out" in r.getMessage() for r in caplog.records)


def test_separate_validation_cache_shares_no_file_with_training(grey_folder, tmp_path):
    """data.val_cache_dir: files are held out, never trained on. A training cache of the other files trains on all
    of them; one that also holds clips of a validation file is refused (as data.video.val_root is), naming both
    folders and how many files they share, by the training run too."""
    ae = build_autoencoder("identity", patch_size=2)
    decode = lambda z: ae.decode(z[None])[0]  # noqa: E731
    cfg = VideoDataConfig(**video_cfg(grey_folder, val_fraction=0.15))
    for name, split in (("val_cache", "val"), ("train_cache", "train"), ("all_cache", "all")):
        build_latent_cache(tmp_path / name, VideoDataset(cfg, split=split), ae, lowres_factor=2, dtype="float32",
                           progress=False)
    train, val, note = split_cache(tmp_path / "train_cache", 0.05, tmp_path / "val_cache")
    train_files = {file_of(decode(train[i]["z_hi"])) for i in range(len(train))}
    val_files = {file_of(decode(val[i]["z_hi"])) for i in range(len(val))}
    assert val_files and not train_files & val_files and train_files | val_files == set(range(NUM_FILES))
    assert f"all {len(val)} items of data.val_cache_dir" in note and f"{len(val_files)} source files" in note

    leak = rf"data\.val_cache_dir=\S*val_cache shares {len(val_files)} source files with data\.cache_dir=\S*all_cache"
    with pytest.raises(ValueError, match=leak):
        split_cache(tmp_path / "all_cache", 0.05, tmp_path / "val_cache")
    run = tiny_config(tmp_path / "run", max_steps=1)
    run.data.source, run.data.cache_dir = "cache", str(tmp_path / "all_cache")
    run.data.val_cache_dir = str(tmp_path / "val_cache")
    with pytest.raises(ValueError, match=leak):
        Trainer(run)


def test_files_reached_through_symbolic_links_are_the_same_files(grey_folder, tmp_path):
    """The train/validation overlap checks compare files with links resolved: a validation folder that links to the
    training folder, a validation file that links to a training file, a validation cache made through such a link,
    or data.val_cache_dir linking to data.cache_dir, are all refused (they were compared by path as written)."""
    from mardini.training.config import validate_config

    link = tmp_path / "linked_grey"
    link.symlink_to(grey_folder, target_is_directory=True)
    with pytest.raises(ValueError, match=rf"data\.video\.val_root=.*shares {NUM_FILES} files with data\.video\.root"):
        split_manifests(VideoDataConfig(**video_cfg(grey_folder, val_root=str(link))))
    val = tmp_path / "val"
    val.mkdir()
    (val / "mine.mp4").symlink_to(grey_folder / "v03.mp4")
    with pytest.raises(ValueError, match=r"shares 1 files with data\.video\.root"):
        split_manifests(VideoDataConfig(**video_cfg(grey_folder, val_root=str(val))))

    ae = build_autoencoder("identity", patch_size=2)
    for name, root in (("train_cache", grey_folder), ("val_cache", link)):
        build_latent_cache(tmp_path / name, VideoDataset(VideoDataConfig(**video_cfg(root, num_videos=2))), ae,
                           lowres_factor=2, dtype="float32", progress=False)
    with pytest.raises(ValueError, match=r"data\.val_cache_dir=\S*val_cache shares 2 source files"):
        split_cache(tmp_path / "train_cache", 0.05, tmp_path / "val_cache")

    (tmp_path / "same_cache").symlink_to(tmp_path / "train_cache", target_is_directory=True)
    cfg = tiny_config(tmp_path / "run", max_steps=1)
    cfg.data.source, cfg.data.cache_dir = "cache", str(tmp_path / "train_cache")
    cfg.data.val_cache_dir = str(tmp_path / "same_cache")
    with pytest.raises(ValueError, match=r"data\.val_cache_dir \(\S*same_cache\) must be another folder than "
                                         r"data\.cache_dir"):
        validate_config(cfg)
    cfg.data.val_cache_dir = str(tmp_path / "val_cache")  # another folder passes this check
    validate_config(cfg)
