"""The map-style VideoDataset: clips from real video files, robust to bad files, deterministic per index.

``VideoDataset`` reads entry i of a manifest (a folder or a .csv/.jsonl file, see manifest.py) with
``decode.read_clip`` (decord, PyAV fallback), picks the clip's frames with ``decode.clip_indices`` and resizes +
crops them with ``transforms.resize_crop``.

Item ``i`` is a pure function of ``(seed, i)``: the clip start, the crop offset and the replacement chosen for a
broken file are drawn from ``numpy.random.default_rng([seed, epoch, i, attempt])``, never from worker ids or call
order, so any number of DataLoader workers, any rank split and an exact resume all see the same tensors. A file
that cannot be used (unreadable, truncated, too short) is logged, replaced by a deterministically chosen other
entry, and named in the item's ``"skipped"`` field, so the main process can count failures across workers with
``SkipStats``. Too many failures raise ``TooManyFailuresError``.

Validation never reads a training file: ``split_manifests`` gives the training and the validation files of a
config, either ``val_root`` (a separate folder or manifest) or, when it is empty, a held-out ``val_fraction`` of
``root``'s files chosen by a hash of each file's path (stable when files are added or reordered).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, List

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import (  # noqa: F401  (re-exported: the reading API is importable from here too)
    BACKENDS,
    CLIP_STARTS,
    DecordReader,
    PyAVReader,
    VideoDecodeError,
    VideoInfo,
    VideoTooShortError,
    clip_indices,
    decord_available,
    open_video,
    probe_video,
    read_clip,
    read_frames,
)
from .manifest import VIDEO_EXTENSIONS, Manifest, load_manifest
from .transforms import CROPS, resize_crop

log = logging.getLogger("mardini.data")


class TooManyFailuresError(RuntimeError):
    """More than the allowed fraction of samples failed to load: the data (or its path) is probably wrong."""


# ---------------------------------------------------------------------------------------------------------------
# Failure accounting
# ---------------------------------------------------------------------------------------------------------------


def skipped_paths(item_or_batch: dict) -> list[str]:
    """The files a sample (or a collated batch) skipped: its "skipped" field holds them joined by newlines."""
    value = item_or_batch.get("skipped", "")
    texts = [value] if isinstance(value, str) else list(value)
    return [p for text in texts for p in text.split("\n") if p]


class SkipStats:
    """Counts loaded and skipped samples; raises TooManyFailuresError past the allowed fraction.

    The dataset keeps one per process (workers cannot share it); the trainer keeps one in the main process and
    calls ``update(batch)`` on every batch, which sees every worker's failures through the batch itself.
    """

    def __init__(self, max_failure_fraction: float = 0.1, min_failures: int = 20, keep: int = 1000):
        self.max_failure_fraction = max_failure_fraction
        self.min_failures = min_failures
        self.keep = keep  # distinct paths remembered (for the error message and the logs)
        self.loaded = 0  # samples delivered
        self.failed = 0  # failed attempts (a sample may fail several times before a good replacement)
        self.paths: Counter[str] = Counter()

    @property
    def attempts(self) -> int:
        return self.loaded + self.failed

    @property
    def fraction(self) -> float:
        return self.failed / self.attempts if self.attempts else 0.0

    def record(self, loaded: int = 0, failed_paths: list[str] = ()) -> None:
        self.loaded += loaded
        self.failed += len(failed_paths)
        for p in failed_paths:
            if p in self.paths or len(self.paths) < self.keep:
                self.paths[p] += 1

    def update(self, batch: dict, check: bool = True) -> list[str]:
        """Count a collated batch (or one item) from VideoDataset; returns the paths it skipped."""
        video = batch.get("video")
        n = 1 if video is None or video.ndim == 4 else int(video.shape[0])
        failed = skipped_paths(batch)
        self.record(n, failed)
        if check:
            self.check()
        return failed

    def too_many(self) -> bool:
        return self.failed >= max(self.min_failures, 1) and self.fraction > self.max_failure_fraction

    def check(self) -> None:
        if self.too_many():
            raise TooManyFailuresError(self.message())

    def message(self) -> str:
        names = ", ".join(p for p, _ in self.paths.most_common(5))
        return (
            f"{self.failed} of {self.attempts} video loads failed ({100 * self.fraction:.1f}% > "
            f"max_failure_fraction={100 * self.max_failure_fraction:.1f}%); e.g. {names}. Check the files (run "
            f"scripts/make_manifest.py to list bad ones) or raise data.video.max_failure_fraction."
        )

    def log_dict(self, prefix: str = "data/") -> dict:
        return {f"{prefix}skipped_total": self.failed, f"{prefix}skip_fraction": self.fraction}

    def state_dict(self) -> dict:
        return {"loaded": self.loaded, "failed": self.failed, "paths": dict(self.paths)}

    def load_state_dict(self, state: dict) -> None:
        self.loaded, self.failed = int(state["loaded"]), int(state["failed"])
        self.paths = Counter(state.get("paths", {}))


# ---------------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class VideoDataConfig:
    """Clips from real video files (also an OmegaConf structured config)."""

    root: str = ""  # a folder of videos (scanned recursively) or a manifest (.csv / .jsonl with a 'path' column)
    val_root: str = ""  # validation-only folder or manifest ("" = hold out val_fraction of root's files)
    val_fraction: float = 0.05  # with val_root "": fraction of root's files held out for validation (>= 1 file)
    extensions: List[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))  # folder scan: file suffixes
    num_videos: int = 0  # use only the first N entries (0 = all)
    num_frames: int = 17  # frames per clip, T
    height: int = 256  # clip height in pixels, H
    width: int = 256  # clip width in pixels, W
    fps: float = 8.0  # sampling rate of the clips (a manifest 'fps' overrides it per entry; 0 = use frame_stride)
    frame_stride: int = 1  # with fps = 0: take every k-th source frame
    clip_start: str = "random"  # random (seeded per sample) | first | center: where in the file the clip starts
    crop: str = "center"  # center | random (seeded per sample): crop after resizing the short side
    backend: str = "auto"  # auto (decord, PyAV if decord fails) | decord | pyav
    decode_threads: int = 1  # decoder threads per DataLoader worker (0 = decoder's choice)
    seed: int = 0  # with the index (and epoch), the only source of randomness
    max_attempts: int = 10  # tries per sample (the first file, then deterministic replacements) before failing
    max_failure_fraction: float = 0.1  # raise once more than this fraction of loads failed ...
    min_failures: int = 20  # ... and at least this many did (so one bad file early on is not fatal)


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def read_video_config(cfg: Any) -> VideoDataConfig:
    """Copy from a dataclass, a DictConfig or a dict, then check values (errors name the key)."""
    names = [f.name for f in fields(VideoDataConfig)]
    if isinstance(cfg, dict):
        unknown = sorted(set(cfg) - set(names))
        if unknown:
            raise ValueError(f"data.video: unknown keys {unknown}; known: {names}")
        get = cfg.get
    else:
        get = lambda key, default: getattr(cfg, key, default)  # noqa: E731
    values = {f.name: get(f.name, _default(f)) for f in fields(VideoDataConfig)}
    values["extensions"] = [str(e) for e in values["extensions"]]
    out = VideoDataConfig(**values)

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"data.video.{key} {msg}")

    need(isinstance(out.root, str), "root", f"must be a path string, got {out.root!r}")
    need(isinstance(out.val_root, str), "val_root", f"must be a path string, got {out.val_root!r}")
    need(0 < out.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {out.val_fraction} (validation files "
                                                    f"are never trained on; give data.video.val_root instead)")
    for key, low in (("num_frames", 1), ("height", 1), ("width", 1), ("frame_stride", 1), ("max_attempts", 1),
                     ("num_videos", 0), ("decode_threads", 0), ("min_failures", 0), ("seed", 0)):
        value = getattr(out, key)
        need(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low, key,
             f"must be an int >= {low}, got {value!r}")
    need(out.fps >= 0, "fps", f"must be >= 0, got {out.fps}")
    need(out.clip_start in CLIP_STARTS, "clip_start", f"must be one of {CLIP_STARTS}, got {out.clip_start!r}")
    need(out.crop in CROPS, "crop", f"must be one of {CROPS}, got {out.crop!r}")
    need(out.backend in BACKENDS, "backend", f"must be one of {BACKENDS}, got {out.backend!r}")
    need(0 <= out.max_failure_fraction <= 1, "max_failure_fraction",
         f"must be in [0, 1], got {out.max_failure_fraction}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training / validation files
# ---------------------------------------------------------------------------------------------------------------

SPLITS = ("all", "train", "val")


def _hash_fraction(key: str) -> float:
    """A stable uniform number in [0, 1) for a string (the same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64


def held_out(keys: list[str], fraction: float) -> list[int]:
    """Indices of the keys held out for validation: those whose hash falls below `fraction`, or, if none does,
    the one with the smallest hash (at least one file). Membership of a key does not depend on the other keys
    (beyond that fallback), so adding files never moves a validation file into training."""
    hashes = [_hash_fraction(k) for k in keys]
    chosen = [i for i, h in enumerate(hashes) if h < fraction]
    return chosen or ([min(range(len(keys)), key=hashes.__getitem__)] if keys else [])


def split_key(path: str, root: str) -> str:
    """What the hold-out hashes: the path relative to the folder of `root` (a folder or a manifest file), so a
    dataset keeps its split when it is moved."""
    base = root if os.path.isdir(root) else os.path.dirname(os.path.abspath(root))
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base))


def resolved_paths(paths) -> list[str]:
    """Each path absolute with symbolic links resolved (as os.path.realpath), so that a file reached through a linked
    folder, or through a link of its own, is known as the same file. Each folder is resolved once and a file only
    where it is a link itself: one lstat per file, as a manifest may list millions."""
    folders: dict[str, str] = {}
    out = []
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        full = os.path.join(folders[folder], name)
        out.append(os.path.realpath(full) if os.path.islink(full) else full)
    return out


FILES_CHECKED = 64  # manifest entries whose files are looked for at start-up (a stat each: cheap at any size)


def check_manifest_files(manifest: "Manifest", key: str, source: str) -> None:
    """A manifest whose paths point nowhere (moved videos, paths relative to another folder) would pass the start-up
    and fail at the first batch after retries of the same missing files: look for the files of up to FILES_CHECKED
    entries spread over the manifest; none there is an error, some missing a warning (they are skipped later)."""
    if len(manifest) == 0:
        return
    picked = sorted({round(i * (len(manifest) - 1) / max(FILES_CHECKED - 1, 1)) for i in range(FILES_CHECKED)})
    missing = [manifest[i].path for i in picked if not os.path.exists(manifest[i].path)]
    if len(missing) == len(picked):
        raise FileNotFoundError(f"{key}={source}: none of the {len(picked)} video files looked for exists (e.g. "
                                f"{missing[0]}; a manifest's relative paths are read from its own folder)")
    if missing:
        log.warning("%s=%s: %d of %d video files looked for are missing (e.g. %s); they will be skipped", key, source,
                    len(missing), len(picked), missing[0])


def _load_named(source: str, key: str, extensions) -> "Manifest":
    """load_manifest, its error naming the config key (and the working folder a relative path was read from);
    checks that the files are there (check_manifest_files)."""
    try:
        manifest = load_manifest(source, extensions)
    except FileNotFoundError:
        where = "" if os.path.isabs(source) else f" (relative to the working folder {os.getcwd()})"
        hint = (f"; without videos at hand, `python scripts/make_photo_corpus.py DIR` writes clips of real photographs "
                f"in motion with DIR/train.csv and DIR/val.csv") if key == "data.video.root" else ""
        raise FileNotFoundError(f"{key}={source}: no folder or manifest file there{where}{hint}") from None
    check_manifest_files(manifest, key, source)
    return manifest


def split_manifests(cfg: Any) -> tuple[Manifest, Manifest, str]:
    """(training files, validation files, a sentence saying what is held out) for a data.video config."""
    cfg = read_video_config(cfg)
    if not cfg.root:
        raise ValueError("data.video.root is empty: give a folder of videos or a manifest file")
    root = _load_named(cfg.root, "data.video.root", cfg.extensions)
    if cfg.val_root:
        val = _load_named(cfg.val_root, "data.video.val_root", cfg.extensions)
        shared = sorted(set(resolved_paths(root.paths)) & set(resolved_paths(val.paths)))  # links too
        if shared:
            raise ValueError(f"data.video.val_root={cfg.val_root} shares {len(shared)} files with data.video.root "
                             f"(e.g. {shared[0]}): validation files must never be trained on")
        return root, val, f"validation: all {len(val)} files of data.video.val_root={cfg.val_root}"
    paths = root.paths
    if not paths:
        raise ValueError(f"data.video.root={cfg.root} holds no video files (data.video.extensions: "
                         f"{', '.join(cfg.extensions)})")
    if len(paths) < 2:
        raise ValueError(f"data.video.root={cfg.root} has {len(paths)} file(s): none can be held out for "
                         f"validation and still leave one to train on; give data.video.val_root")
    chosen = set(held_out([split_key(p, cfg.root) for p in paths], cfg.val_fraction))
    train = Manifest([root[i] for i in range(len(root)) if i not in chosen])
    val = Manifest([root[i] for i in sorted(chosen)])
    names = ", ".join(split_key(p, cfg.root) for p in val.paths[:5]) + (", ..." if len(val) > 5 else "")
    note = (f"validation: {len(val)} of {len(root)} files of data.video.root held out (data.video.val_fraction="
            f"{cfg.val_fraction}, by a hash of the path; never trained on): {names}")
    return train, val, note


class VideoDataset(Dataset):
    """Map-style dataset of clips from a folder or a manifest.

    Item i -> {"video": float32 [T, 3, H, W] in [-1, 1], "index": i, "source": entry actually read,
    "path": its file, "clip_start": seconds of the first frame, "clip_fps": frames per second of the clip,
    "frame_indices": int64 [T] source frames, "skipped": "\\n"-joined paths that failed first (usually ""),
    "num_skipped": int}. All of it collates with the default collate_fn.
    """

    def __init__(self, cfg: Any, manifest: Manifest | None = None, split: str = "all"):
        """split: "all" reads every file of root; "train" / "val" the training / validation files of
        split_manifests (the trainer uses these); an explicit manifest is read as given. num_videos limits
        "all" and "train" (after the hold-out, so validation files do not depend on it)."""
        self.cfg = read_video_config(cfg)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split_note = ""
        if manifest is None:
            if not self.cfg.root:
                raise ValueError("data.video.root is empty: give a folder of videos or a manifest file")
            if split == "all":
                manifest = _load_named(self.cfg.root, "data.video.root", self.cfg.extensions)
            else:
                train, val, self.split_note = split_manifests(self.cfg)
                manifest = train if split == "train" else val
        if self.cfg.num_videos and split != "val":
            manifest = manifest.head(self.cfg.num_videos)
        if len(manifest) == 0:
            raise ValueError(f"data.video.root={self.cfg.root} holds no video files (data.video.extensions: "
                             f"{', '.join(self.cfg.extensions)})")
        self.manifest = manifest
        self.stats = SkipStats(self.cfg.max_failure_fraction, self.cfg.min_failures)  # this process only

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def clip_rng(self, index: int, epoch: int = 0, attempt: int = 0) -> np.random.Generator:
        """The generator behind sample (index, epoch, attempt): clip start, crop, replacement."""
        return np.random.default_rng([self.cfg.seed, epoch, index, attempt])

    def clips(self, count: int) -> torch.Tensor:
        """[count, T, 3, H, W]: one clip per file in order, then further rounds with other starts (epochs) when
        `count` exceeds the number of files (fixed validation and benchmark sets)."""
        return torch.stack([self.get(i % len(self), epoch=i // len(self))["video"] for i in range(count)])

    def get(self, index: int, epoch: int = 0) -> dict:
        """Item `index`; a different `epoch` draws other clip starts and crops from the same files."""
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        skipped: list[str] = []
        source, tried = index, {index}
        for attempt in range(self.cfg.max_attempts):
            rng = self.clip_rng(index, epoch, attempt)
            if attempt > 0:  # a replacement that depends only on (seed, epoch, index, attempt), not one tried before
                for _ in range(16):  # where untried files remain, 16 draws all miss them with chance (tried/n)^16
                    source = int(rng.integers(len(self)))
                    if source not in tried or len(tried) >= len(self):
                        break
                tried.add(source)
            try:
                item = self.load(source, rng)
            except VideoDecodeError as e:
                path = self.manifest[source].path
                log.warning("skipping video %s (sample %d, attempt %d): %s", path, index, attempt, e)
                skipped.append(path)
                self.stats.record(0, [path])
                self.stats.check()
                continue
            self.stats.record(1)
            item.update(index=index, source=source, skipped="\n".join(skipped), num_skipped=len(skipped))
            return item
        raise TooManyFailuresError(
            f"sample {index}: {self.cfg.max_attempts} attempts failed (data.video.max_attempts); tried "
            + ", ".join(skipped[:5])
        )

    def load(self, source: int, rng: np.random.Generator) -> dict:
        """Read entry `source` with the draws of rng (clip start first, then crop); raises VideoDecodeError."""
        cfg, entry = self.cfg, self.manifest[source]
        fps = entry.fps if entry.fps else cfg.fps
        start_seed = int(rng.integers(2**63))  # one draw, so a retry with the other backend picks the same clip

        def pick(num_available: int, video_fps: float) -> list[int]:
            return clip_indices(num_available, video_fps, cfg.num_frames, fps=fps, stride=cfg.frame_stride,
                                start=cfg.clip_start, rng=np.random.default_rng(start_seed),
                                window=(entry.start, entry.end))

        frames, indices, video_fps = read_clip(entry.path, pick, cfg.backend, cfg.decode_threads)
        video = resize_crop(frames, cfg.height, cfg.width, cfg.crop, rng)
        step = (video_fps / fps) if fps else cfg.frame_stride
        return {
            "video": video,
            "path": entry.path,
            "clip_start": indices[0] / video_fps if video_fps else 0.0,
            "clip_fps": video_fps / step if video_fps else 0.0,
            "frame_indices": torch.tensor(indices, dtype=torch.int64),
        }
