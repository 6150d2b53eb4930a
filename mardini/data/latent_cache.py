"""Latent cache: encode a dataset's clips once, train from the stored latents.

Layout of a cache folder::

    cache.json                     what was cached (dataset and autoencoder settings, sizes, lowres factor/mode,
                                   storage dtype) and, once every shard exists, "complete": true and the shapes
    shard_000000.safetensors       items [0, S): tensors z_hi [n, T, C, h, w], z_lo [n, T, C, h/r, w/r],
    shard_000001.safetensors       index [n] (int64); header metadata "samples": JSON list of each item's
    ...                            source path, clip start (s), clip fps, source frame indices, skipped files

Item i lives in shard i // S at row i % S, and is exactly what ``dataset[i]`` gives, encoded: the dataset's
clip choice must be deterministic per index (``VideoDataset`` is: starts are seeded by (seed, index) and
recorded in the metadata), so a cached run and an on-the-fly run train on the same latents.

Writing is resumable: a shard is written to a hidden temporary name and renamed when complete, so after a crash
a rerun finds each shard either complete (its header is read and checked, then skipped) or missing (written
again); stale temporary files are removed. Several processes (``scripts/cache_latents.py`` under
``accelerate launch``) split the shards: process r writes shards r, r + W, r + 2W, ...; the main process writes
cache.json first and marks the cache complete at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..dicts import dotted
from ..files import follow_umask
from .transforms import downsample, lowres_pixels
from .workers import items_in_words, timed_out

log = logging.getLogger("mardini.data")

CACHE_VERSION = 1
META_NAME = "cache.json"
LOWRES_MODES = ("latents", "pixels")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_VOLATILE_KEYS = ("complete", "shapes")  # set by finalize(); not part of what must match on a rerun
# Settings that name local paths. The writer records them absolute (the cache is read, and completed, from other
# working directories); a cache of an older version recorded them as given, read relative to the working directory.
PATH_SETTINGS = ("dataset.config.root", "dataset.config.val_root", "autoencoder.pretrained", "extra.source")


class LatentCacheError(RuntimeError):
    """A cache that cannot be trained from as it is (incomplete, another version, an unreadable shard): the user's
    to fix (mardini-train prints it as one line, mardini.cli.USER_ERRORS), usually by running the writer again."""


def shard_name(k: int) -> str:
    return f"shard_{k:06d}.safetensors"


def encode_hi_lo(autoencoder, video: Tensor, lowres_factor: int, lowres_mode: str = "latents") -> tuple[Tensor, Tensor]:
    """Pixels [B, T, 3, H, W] in [-1, 1] -> (z_hi [B, T', C, h, w], z_lo [B, T', C, h/r, w/r]).

    lowres_mode="latents" (the default): z_lo is z_hi averaged over r x r cells (the same pooling the trainer
    applies); "pixels": the pixels are averaged over r x r first and then encoded. Call under torch.no_grad().
    """
    if lowres_mode not in LOWRES_MODES:
        raise ValueError(f"lowres_mode must be one of {LOWRES_MODES}, got {lowres_mode!r}")
    z_hi = autoencoder.encode(video)
    if lowres_mode == "latents":
        z_lo = downsample(z_hi, lowres_factor)
    else:
        z_lo = autoencoder.encode(lowres_pixels(video, lowres_factor))
    return z_hi, z_lo


def encode_given(autoencoder, video: Tensor, mask: Tensor, lowres_factor: int,
                 lowres_mode: str = "latents") -> tuple[Tensor, Tensor]:
    """The model inputs at inference, built as training builds them: pixels [B, T, 3, H, W] and mask [B, T]
    (True = frame to generate; its pixels are ignored) -> (z_hi, z_lo) by encode_hi_lo, with the generated frames'
    latents zeroed (the planner never reads them). A model trained with lowres_mode="pixels" must get its z_lo
    this way too, not by pooling z_hi. Call under torch.no_grad().

    A per-frame autoencoder (temporal_compression 1) encodes the given frames only: image-to-video at 12 frames
    encodes one frame, not twelve; each frame's latents are what encoding the whole clip gives it."""
    generated = mask.to(video.device)
    if getattr(autoencoder, "temporal_compression", 1) != 1 or bool(generated.all()):
        z_hi, z_lo = encode_hi_lo(autoencoder, video, lowres_factor, lowres_mode)
        keep = ~generated[:, :, None, None, None]
        return torch.where(keep, z_hi, 0.0), torch.where(keep, z_lo, 0.0)
    given_hi, given_lo = encode_hi_lo(autoencoder, video[~generated][None], lowres_factor, lowres_mode)  # [1, G, ...]
    z_hi = given_hi.new_zeros(*mask.shape, *given_hi.shape[2:])
    z_lo = given_lo.new_zeros(*mask.shape, *given_lo.shape[2:])
    z_hi[~generated], z_lo[~generated] = given_hi[0], given_lo[0]
    return z_hi, z_lo


def describe_autoencoder(autoencoder) -> dict:
    """A JSON-able description of an autoencoder (VideoAutoencoder.describe)."""
    return _jsonable(autoencoder.describe())


def describe_dataset(dataset) -> dict:
    """A JSON-able description of a dataset: its class and its config (for the cache's fingerprint)."""
    cfg = getattr(dataset, "cfg", None)
    out: dict[str, Any] = {"class": type(dataset).__name__, "length": len(dataset)}
    if dataclasses.is_dataclass(cfg):
        out["config"] = _jsonable(dataclasses.asdict(cfg))
    return out


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def _absolute(path: str) -> str:
    from ..autoencoders.kl import absolute_folder

    return absolute_folder(path)


def _paths_absolute(meta: dict) -> dict:
    """A copy of cache metadata with each non-empty PATH_SETTINGS value absolute (relative to the working
    directory)."""
    meta = json.loads(json.dumps(meta))
    for key in PATH_SETTINGS:
        *parents, leaf = key.split(".")
        node = meta
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
            node[leaf] = _absolute(node[leaf])
    return meta


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_cache_meta(root: str | os.PathLike) -> dict:
    path = Path(root) / META_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{root} is not a latent cache (no {META_NAME}); build one with scripts/cache_latents.py"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): not a latent cache, or a damaged one") from None


class LatentCacheWriter:
    """Encodes ``dataset`` with ``autoencoder`` into the cache folder ``root`` (see the module docstring).

    One process::

        writer = LatentCacheWriter(root, dataset, autoencoder, lowres_factor=2)
        writer.write_meta(); writer.run(); writer.finalize()

    Several: the main process calls ``write_meta()``, every process (after a barrier) ``run(rank, world_size)``,
    and after another barrier the main process ``finalize()``.

    ``extra``: JSON-able notes kept in cache.json and compared on a rerun; its ``source`` entry is the local path
    the clips came from. Paths (PATH_SETTINGS, and each clip's file) are recorded absolute, whatever the working
    directory, so that the cache is read and completed alike from anywhere.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        dataset: Dataset,
        autoencoder,
        lowres_factor: int = 2,
        lowres_mode: str = "latents",
        shard_size: int = 256,
        dtype: str = "float16",
        extra: Optional[dict] = None,
    ):
        if lowres_mode not in LOWRES_MODES:
            raise ValueError(f"lowres_mode must be one of {LOWRES_MODES}, got {lowres_mode!r}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        if shard_size < 1 or lowres_factor < 1:
            raise ValueError(f"shard_size ({shard_size}) and lowres_factor ({lowres_factor}) must be >= 1")
        self.root = Path(root)
        self.dataset, self.autoencoder = dataset, autoencoder
        self.lowres_factor, self.lowres_mode = lowres_factor, lowres_mode
        self.shard_size, self.dtype = shard_size, dtype
        self.num_items = len(dataset)
        self.num_shards = math.ceil(self.num_items / shard_size)
        self.meta = _paths_absolute({
            "version": CACHE_VERSION,
            "num_items": self.num_items,
            "shard_size": shard_size,
            "num_shards": self.num_shards,
            "lowres_factor": lowres_factor,
            "lowres_mode": lowres_mode,
            "dtype": dtype,
            "dataset": describe_dataset(dataset),
            "autoencoder": describe_autoencoder(autoencoder),
            "extra": _jsonable(extra or {}),
        })

    # ---------------------------------------------------------------------------------------------- metadata
    def _mismatch(self, old: dict) -> list[str]:
        """Each setting that differs, by its dotted key (dataset.config.num_frames): whole dicts side by side left
        the user to find the one value that differs. A path an older version recorded relative is read relative to
        the working directory, so finishing its cache from there with the same source is accepted."""
        old, new = dotted(_paths_absolute(old)), dotted(self.meta)
        keys = sorted(k for k in set(old) | set(new) if k.split(".")[0] not in _VOLATILE_KEYS)
        return [f"{k}: cached {old.get(k)!r} != now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]

    def write_meta(self) -> None:
        """Main process: create the folder and cache.json, or check that an existing cache has the same settings."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / META_NAME
        if path.exists():
            self.check_meta()
            return
        _write_json(path, {**self.meta, "complete": False})

    def check_meta(self) -> None:
        old = read_cache_meta(self.root)
        diff = self._mismatch(old)
        if diff:
            empty = " (it holds no shard yet: nothing is lost)" if not any(self.root.glob("shard_*")) else ""
            raise ValueError(
                f"the latent cache in {self.root} was built with other settings ({'; '.join(diff)[:2000]}); "
                f"use another folder or delete this one{empty}"
            )

    # ------------------------------------------------------------------------------------------------ shards
    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_items))

    def shard_complete(self, k: int) -> bool:
        """Shard k exists, its header reads, and it holds the expected items (else it is deleted)."""
        path = self.root / shard_name(k)
        if not path.exists():
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                ok = int(meta.get("count", -1)) == len(self.shard_range(k)) and int(meta.get("first_index", -1)) == \
                    self.shard_range(k).start and f.get_slice("z_hi").get_shape()[0] == len(self.shard_range(k))
        except Exception as e:
            log.warning("latent cache: %s is unreadable (%s); it will be written again", path, e)
            ok = False
        if not ok:
            path.unlink(missing_ok=True)
        return ok

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This process's shards that are not complete yet (removing its stale temporary files)."""
        mine = range(rank, self.num_shards, world_size)
        for k in mine:
            for tmp in self.root.glob(f".{shard_name(k)}.*.tmp"):
                tmp.unlink(missing_ok=True)
        return [k for k in mine if not self.shard_complete(k)]

    def run(
        self,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 8,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        max_shards: Optional[int] = None,
        progress: bool = True,
        timeout: float = 600.0,
    ) -> list[int]:
        """Encode this process's missing shards (at most max_shards of them); returns the shards written. With
        workers, a batch that takes longer than `timeout` seconds (0: no limit) stops the run with a
        LatentCacheError naming its files (a decoder or file system stuck on one); the shards written stay."""
        from tqdm.auto import tqdm

        self.check_meta()
        pending = self.pending_shards(rank, world_size)
        if max_shards is not None:
            pending = pending[:max_shards]
        if not pending:
            return []
        # One DataLoader for all of this process's work; batches never straddle two shards.
        batches = [list(r[i : i + batch_size]) for k in pending for r in [self.shard_range(k)]
                   for i in range(0, len(r), batch_size)]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=num_workers,
                            pin_memory=torch.device(device).type == "cuda", persistent_workers=False,
                            timeout=timeout if num_workers else 0)
        storage = STORAGE_DTYPES[self.dtype]
        written, parts = [], {"z_hi": [], "z_lo": [], "index": [], "samples": []}
        k_iter = iter(pending)
        k = next(k_iter)
        bar = tqdm(total=sum(len(self.shard_range(s)) for s in pending), desc=f"cache[{rank}]", disable=not progress)
        self.autoencoder.to(device)
        for batch in _within_timeout(loader, batches, self.dataset, timeout, written):
            video = batch["video"].to(device, dtype=torch.float32, non_blocking=True)
            with torch.no_grad():
                z_hi, z_lo = encode_hi_lo(self.autoencoder, video, self.lowres_factor, self.lowres_mode)
            parts["z_hi"].append(z_hi.to("cpu", storage))
            parts["z_lo"].append(z_lo.to("cpu", storage))
            parts["index"].append(torch.as_tensor(batch["index"], dtype=torch.int64).reshape(-1))
            parts["samples"] += _sample_records(batch)
            bar.update(video.shape[0])
            if sum(len(x) for x in parts["index"]) == len(self.shard_range(k)):
                self._write_shard(k, parts)
                written.append(k)
                parts = {"z_hi": [], "z_lo": [], "index": [], "samples": []}
                k = next(k_iter, None)
        bar.close()
        return written

    def _write_shard(self, k: int, parts: dict) -> None:
        from safetensors.torch import save_file

        index = torch.cat(parts["index"])
        expected = torch.tensor(list(self.shard_range(k)), dtype=torch.int64)
        if not torch.equal(index, expected):
            raise RuntimeError(f"shard {k}: items came out of order ({index.tolist()[:8]} ...); this is a bug")
        tensors = {"z_hi": torch.cat(parts["z_hi"]).contiguous(), "z_lo": torch.cat(parts["z_lo"]).contiguous(),
                   "index": index}
        metadata = {"format": "mardini-latent-cache", "version": str(CACHE_VERSION), "shard": str(k),
                    "count": str(len(index)), "first_index": str(int(index[0])),
                    "samples": json.dumps(parts["samples"])}
        final = self.root / shard_name(k)
        tmp = self.root / f".{shard_name(k)}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            follow_umask(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def finalize(self) -> dict:
        """Main process, after every process's run(): check every shard, mark the cache complete, record shapes."""
        missing = [k for k in range(self.num_shards) if not self.shard_complete(k)]
        if missing:
            raise RuntimeError(f"latent cache {self.root}: shards {missing[:10]} are missing; run the writer again")
        from safetensors import safe_open

        with safe_open(str(self.root / shard_name(0)), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape()[1:] for key in ("z_hi", "z_lo")}
        meta = {**self.meta, "complete": True, "shapes": shapes}
        _write_json(self.root / META_NAME, meta)
        return meta


def run_settings(described: dict) -> str:
    """The overrides that give a run the autoencoder a cache describes (describe_autoencoder): the scale hint alone
    misled when the cache was made with another autoencoder altogether."""
    from ..autoencoders import AUTOENCODERS

    name = next((n for n, c in AUTOENCODERS.items() if c.__name__ == described.get("class")), described.get("class"))
    if name == "identity":
        parts = [f"autoencoder.patch_size={described.get('spatial_compression')}",
                 f"autoencoder.scale={described.get('scaling_factor')}",
                 f"autoencoder.shift={described.get('shift_factor')}"]
    else:
        parts = [f"autoencoder.{k}={described[k]}" for k in ("pretrained", "subfolder") if described.get(k)]
    return " ".join([f"autoencoder={name}", *parts, f"model.latent_channels={described.get('latent_channels')}"])


def _sample_records(batch: dict) -> list[dict]:
    """Per-item metadata of a collated batch: every field except the pixels, as plain Python values; the clip's file
    ("path") and the files skipped before it ("skipped", one a line) absolute, as the cache's settings."""
    n = int(batch["video"].shape[0])
    records = [{} for _ in range(n)]
    for key, value in batch.items():
        if key == "video":
            continue
        values = value.tolist() if isinstance(value, Tensor) else list(value)
        for record, v in zip(records, values):
            if key == "path" and isinstance(v, str) and v:
                v = _absolute(v)
            elif key == "skipped" and isinstance(v, str) and v:
                v = "\n".join(_absolute(p) for p in v.split("\n"))
            record[key] = v
    return records


def split_cache(root: str | os.PathLike, val_fraction: float, val_root: str | os.PathLike = "",
                dtype: Optional[torch.dtype] = torch.float32) -> tuple[CachedLatentDataset, CachedLatentDataset, str]:
    """(training items, validation items, a sentence saying what is held out) for data.source=cache.

    val_root (data.val_cache_dir): a separate cache of validation clips, all used for validation; like
    data.video.val_root, it is refused when it shares a source file with the training cache (files are held out,
    never trained on). Otherwise the items whose source file is held out by data.video's rule (a hash of the path
    below val_fraction, at least one file) are validation only, so a cache of the same files holds out what
    data=video would.
    """
    from .video import held_out, resolved_paths

    if val_root:
        train, val = CachedLatentDataset(root, dtype), CachedLatentDataset(val_root, dtype)
        val_files = set(resolved_paths(p for p in val.source_paths() if p))  # a file reached through a link is the
        shared = sorted(val_files & set(resolved_paths(p for p in train.source_paths() if p)))  # same file
        if shared:
            raise ValueError(f"data.val_cache_dir={val_root} shares {len(shared)} source files with data.cache_dir="
                             f"{root} (e.g. {shared[0]}): validation files must never be trained on; cache the "
                             f"training files without them")
        return train, val, (f"validation: all {len(val)} items of data.val_cache_dir={val_root} ({len(val_files)} "
                            f"source files, none of them in data.cache_dir)")
    full = CachedLatentDataset(root, dtype)
    keys = full.source_keys()
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise ValueError(f"latent cache {root} was made from {len(distinct)} source file(s): none can be held out "
                         f"for validation; give data.val_cache_dir (a cache of validation clips)")
    val_keys = {distinct[i] for i in held_out(distinct, val_fraction)}
    val = [i for i, key in enumerate(keys) if key in val_keys]
    train = [i for i, key in enumerate(keys) if key not in val_keys]
    note = (f"validation: {len(val)} of {len(keys)} cached clips ({len(val_keys)} of {len(distinct)} source files, "
            f"data.video.val_fraction={val_fraction}, by a hash of the path) held out of {root}; never trained on")
    return CachedLatentDataset(root, dtype, indices=train), CachedLatentDataset(root, dtype, indices=val), note


def build_latent_cache(root, dataset, autoencoder, *, lowres_factor: int = 2, lowres_mode: str = "latents",
                       shard_size: int = 256, dtype: str = "float16", batch_size: int = 8, num_workers: int = 0,
                       device: str | torch.device = "cpu", progress: bool = True, timeout: float = 600.0) -> dict:
    """Single-process convenience: write (or complete) the cache in root and return its cache.json."""
    writer = LatentCacheWriter(root, dataset, autoencoder, lowres_factor, lowres_mode, shard_size, dtype)
    writer.write_meta()
    writer.run(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress, timeout=timeout)
    return writer.finalize()


def _within_timeout(loader: DataLoader, batches: list[list[int]], dataset, timeout: float, written: list[int]):
    """The loader's batches; torch's timeout error becomes a LatentCacheError naming the late batch's files."""
    iterator = iter(loader)
    for items in batches:
        try:
            yield next(iterator)
        except RuntimeError as err:
            if not timed_out(err):
                raise
            raise LatentCacheError(
                f"no batch from the decoding workers in {timeout:g} s ({items_in_words(dataset, items)}): check or "
                f"remove these files (a decoder or the file system is stuck on one), or give a longer --timeout; "
                f"{len(written)} shard(s) written by this run stay, and running it again continues") from None


class CachedLatentDataset(Dataset):
    """Items of a complete latent cache: {"z_hi": [T, C, h, w], "z_lo": [T, C, h/r, w/r], "index": i}.

    Shards are memory-mapped lazily (a few open at a time per process), so the dataset pickles cheaply into
    DataLoader workers and reads only the rows it needs. Latents come back as ``dtype`` (float32 by default;
    None keeps the storage dtype, e.g. float16: half the bytes through DataLoader workers and host-to-device
    copies, cast on the GPU instead). Reading is cheap: with small latents, num_workers=0 is often fastest.
    """

    def __init__(self, root: str | os.PathLike, dtype: Optional[torch.dtype] = torch.float32, max_open: int = 32,
                 indices: Optional[list[int]] = None):
        """indices: read only these cache items (item k of the dataset is cache item indices[k]); None = all."""
        self.root = Path(root)
        self.meta = read_cache_meta(self.root)
        if not self.meta.get("complete"):
            raise LatentCacheError(
                f"latent cache {self.root} is incomplete (an interrupted run?): run scripts/cache_latents.py again "
                f"with the same arguments to finish it"
            )
        if self.meta.get("version") != CACHE_VERSION:
            raise LatentCacheError(f"latent cache {self.root} has version {self.meta.get('version')}; this version of "
                                   f"mardini reads version {CACHE_VERSION}: build it again with "
                                   f"scripts/cache_latents.py")
        self.dtype, self.max_open = dtype, max_open
        self.shard_size = int(self.meta["shard_size"])
        self._open: OrderedDict = OrderedDict()
        self.indices = None if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return int(self.meta["num_items"]) if self.indices is None else len(self.indices)

    @property
    def num_cached(self) -> int:
        """Items in the cache folder (len(self) counts the selected ones)."""
        return int(self.meta["num_items"])

    @property
    def lowres_factor(self) -> int:
        return int(self.meta["lowres_factor"])

    @property
    def data_config(self) -> dict:
        """The config of the dataset that was cached (num_frames, height, width, fps, ...)."""
        return self.meta["dataset"].get("config", {})

    def _shard(self, k: int):
        handle = self._open.get(k)
        if handle is None:
            from safetensors import safe_open

            path = self.root / shard_name(k)
            if not path.exists():
                raise FileNotFoundError(f"latent cache {self.root}: {path.name} is missing (run "
                                        f"scripts/cache_latents.py again with the same arguments: it writes the "
                                        f"missing shards)")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors' SafetensorError: a truncated or foreign file
                raise LatentCacheError(f"latent cache {self.root}: {path.name} cannot be read ({e}): run "
                                       f"scripts/cache_latents.py again with the same arguments (it writes unreadable "
                                       f"shards again)") from None
            self._open[k] = handle
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(k)
        return handle

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} items")
        if self.indices is not None:
            index = self.indices[index]
        k, row = divmod(index, self.shard_size)
        f = self._shard(k)
        # copy=True: the slices view the memory-mapped file; a copy never outlives (or faults on) the mapping
        z_hi, z_lo = f.get_slice("z_hi")[row : row + 1][0], f.get_slice("z_lo")[row : row + 1][0]
        dtype = self.dtype or z_hi.dtype
        return {"z_hi": z_hi.to(dtype, copy=True), "z_lo": z_lo.to(dtype, copy=True), "index": index}

    def sample_metadata(self, index: int) -> dict:
        """What was recorded for cache item `index` (not a position in a selection): source path, clip start,
        fps, frame indices, skipped files, ..."""
        k, row = divmod(int(index), self.shard_size)
        return json.loads(self._shard(k).metadata()["samples"])[row]

    def source_keys(self) -> list[str]:
        """Per cache item, what the validation hold-out hashes: the source file's path relative to the cached
        dataset's root (the key data=video hashes, see data.video.split_key), or "index:i" for items without a
        file (synthetic clips)."""
        from .video import split_key

        root = str(self.data_config.get("root", "") or "")
        keys = []
        for record in self._records():
            path = record.get("path")
            keys.append(split_key(path, root) if path and root else f"index:{record.get('index', len(keys))}")
        return keys

    def source_paths(self) -> list[Optional[str]]:
        """Per cache item, the absolute path of the file it was cut from (None for synthetic clips): what two
        caches are compared by, as data.video compares its root and val_root. scripts/cache_latents.py records them
        absolute; a cache of an older version recorded them as given, read here relative to the working directory."""
        return [os.path.abspath(r["path"]) if r.get("path") else None for r in self._records()]

    def _records(self):
        """Every cache item's recorded metadata, in item order."""
        for k in range(math.ceil(self.num_cached / self.shard_size)):
            yield from json.loads(self._shard(k).metadata()["samples"])

    def check_compatible(self, autoencoder, lowres_factor: Optional[int] = None,
                         lowres_mode: Optional[str] = None) -> None:
        """Raise if the cache was made with another autoencoder (class, normalisation, latent size), lowres factor
        or lowres mode than the run will use (the export records the mode, so it must be the cache's)."""
        from ..autoencoders.kl import absolute_folder

        cached, now = self.meta["autoencoder"], describe_autoencoder(autoencoder)
        keys = ("class", "scaling_factor", "shift_factor", "latent_channels", "spatial_compression",
                "temporal_compression", "pretrained", "subfolder")
        if cached.get("pretrained") and now.get("pretrained"):  # a cache written with a relative folder (before
            cached = {**cached, "pretrained": absolute_folder(cached["pretrained"])}  # they were recorded absolute)
        diff = [f"{k}: cached {cached.get(k)!r} != {now.get(k)!r}" for k in keys if cached.get(k) != now.get(k)]
        if lowres_factor is not None and lowres_factor != self.lowres_factor:
            diff.append(f"lowres_factor: cached {self.lowres_factor} != model.lowres_factor={lowres_factor}")
        cached_mode = self.meta.get("lowres_mode", "latents")
        if lowres_mode is not None and lowres_mode != cached_mode:
            diff.append(f"lowres_mode: cached {cached_mode!r} != data.lowres_mode={lowres_mode!r}")
        if diff:
            hint = ""
            if any(not d.startswith(("scaling_factor", "shift_factor", "lowres_")) for d in diff):
                hint = (f" (train with the cache's autoencoder, {run_settings(self.meta['autoencoder'])}, or cache "
                        f"the videos with the run's)")
            elif any(d.startswith(("scaling_factor", "shift_factor")) for d in diff):
                hint = (" (the run's autoencoder.scale / autoencoder.shift for the identity autoencoder, "
                        "autoencoder.scaling_factor / autoencoder.shift_factor for a VAE; or build the cache with "
                        "scripts/cache_latents.py --scaling-factor / --shift-factor)")
            raise ValueError(f"latent cache {self.root} does not match this run: " + "; ".join(diff) + hint)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # file handles do not pickle; each worker opens its own
        return state
