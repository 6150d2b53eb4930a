"""Manifests: which video files a dataset reads, and which part of each.

A manifest is either a folder (scanned recursively for .mp4/.avi/.webm/.mkv/.mov, sorted by path, hidden files
skipped) or a file:

- CSV with a header row, or JSONL with one object per line;
- ``path`` (required; relative paths are relative to the manifest's folder);
- ``start``, ``end`` (optional, seconds): clips are taken from this window of the file only;
- ``fps`` (optional): the rate to sample this entry's clips at, overriding the dataset's ``fps``;
- any other columns (``scripts/make_manifest.py`` writes ``num_frames, video_fps, height, width, duration``) are
  kept in the file for people and tools, and ignored here.

``Manifest`` stores the entries in a few flat numpy arrays (one byte buffer for all paths) instead of a list of
Python objects, so that DataLoader workers forked from the main process do not copy it page by page as
reference counts change (the usual "memory grows with workers" problem of large path lists).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger("mardini.data")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass
class ManifestEntry:
    path: str
    start: Optional[float] = None  # seconds: clips begin at or after this time
    end: Optional[float] = None  # seconds: clips end at or before this time
    fps: Optional[float] = None  # sample this entry at this rate (None = the dataset's fps)


class Manifest:
    """An immutable, compact list of ManifestEntry (cheap to pickle and to share with forked workers)."""

    def __init__(self, entries: Iterable[ManifestEntry | str]):
        entries = [e if isinstance(e, ManifestEntry) else ManifestEntry(str(e)) for e in entries]
        encoded = [os.fsencode(e.path) for e in entries]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        self._offsets = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])

        def column(name: str) -> np.ndarray:
            return np.array([_nan(getattr(e, name)) for e in entries], dtype=np.float64)

        self._start, self._end, self._fps = column("start"), column("end"), column("fps")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> ManifestEntry:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"manifest index {i} out of range for {len(self)} entries")
        i %= len(self)
        path = os.fsdecode(self._blob[self._offsets[i] : self._offsets[i + 1]].tobytes())
        return ManifestEntry(path, _none(self._start[i]), _none(self._end[i]), _none(self._fps[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def head(self, n: int) -> "Manifest":
        return Manifest([self[i] for i in range(min(n, len(self)))])

    def shard(self, rank: int, world_size: int) -> "Manifest":
        """Entries rank, rank + world_size, ... (for tools that split files over processes)."""
        return Manifest([self[i] for i in range(rank, len(self), world_size)])

    @property
    def paths(self) -> list[str]:
        return [self[i].path for i in range(len(self))]


def _nan(x) -> float:
    return float("nan") if x is None or x == "" else float(x)


def _none(x: float) -> Optional[float]:
    return None if math.isnan(x) else float(x)


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


def scan_folder(root: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[str]:
    """Video files under root (recursive, suffix match ignoring case, hidden files and folders skipped), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    suffixes = {("." + e.lower().lstrip(".")) for e in extensions}
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes:
                found.append(os.path.join(folder, name))
    return sorted(found)


def read_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Entries of a .csv or .jsonl manifest; relative paths are resolved against the manifest's folder."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest {path}: unsupported suffix {path.suffix!r}; use {MANIFEST_SUFFIXES}")
    rows: list[dict] = []
    with open(path, newline="") as f:
        if suffix == ".csv":
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ValueError(f"manifest {path}: the CSV header must have a 'path' column, got {reader.fieldnames}")
            rows = list(reader)
        else:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"manifest {path}, line {line_no}: not JSON ({e})") from None
                    if not isinstance(row, dict) or "path" not in row:
                        raise ValueError(f"manifest {path}, line {line_no}: needs an object with a 'path' key")
                    rows.append(row)
    base = path.parent
    entries = []
    for k, row in enumerate(rows):
        try:
            p = str(row["path"])
            if not p:
                raise ValueError("empty path")
            entries.append(ManifestEntry(
                path=p if os.path.isabs(p) else str(base / p),
                start=_optional_float(row.get("start")),
                end=_optional_float(row.get("end")),
                fps=_optional_float(row.get("fps")),
            ))
        except (TypeError, ValueError) as e:
            raise ValueError(f"manifest {path}, entry {k} ({row}): {e}") from None
        entry = entries[-1]
        if entry.start is not None and entry.end is not None and entry.end <= entry.start:
            raise ValueError(f"manifest {path}, entry {k}: end ({entry.end}) must be after start ({entry.start})")
        if entry.fps is not None and entry.fps <= 0:
            raise ValueError(f"manifest {path}, entry {k}: fps must be > 0, got {entry.fps}")
    return entries


def _optional_float(x) -> Optional[float]:
    if x is None or (isinstance(x, str) and not x.strip()):
        return None
    return float(x)


def load_manifest(source: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> Manifest:
    """A folder (scanned) or a manifest file (.csv / .jsonl) -> Manifest."""
    source = Path(source)
    if source.is_dir():
        return Manifest(scan_folder(source, extensions))
    if source.is_file():
        return Manifest(read_manifest(source))
    raise FileNotFoundError(f"no folder or manifest file at {source}")


def write_manifest(path: str | os.PathLike, rows: Sequence[dict | ManifestEntry]) -> Path:
    """Write rows (dicts with a 'path' key, or entries) as .csv or .jsonl, atomically (temporary file + rename).

    CSV columns are the union of the rows' keys in first-seen order ('path' first); missing values are empty.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest {path}: unsupported suffix {path.suffix!r}; use {MANIFEST_SUFFIXES}")
    dicts = [asdict(r) if isinstance(r, ManifestEntry) else dict(r) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            if suffix == ".csv":
                columns = ["path"]
                for row in dicts:
                    columns += [k for k in row if k not in columns]
                writer = csv.DictWriter(f, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in dicts)
            else:
                for row in dicts:
                    f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------
# Probing many files (scripts/make_manifest.py)
# ---------------------------------------------------------------------------------------------------------------


def _probe_one(args: tuple) -> tuple[str, Optional[dict], Optional[str]]:
    """(path, decode_check, backend, min_frames) -> (path, info row or None, error or None). Top-level: picklable."""
    from .decode import probe_video  # here, not at import time: keeps manifest.py free of decoder imports

    path, decode_check, backend, min_frames = args
    try:
        info = probe_video(path, decode_check=decode_check, backend=backend)
    except Exception as e:  # any failure is a bad file, reported, never a crash of the whole scan
        return path, None, f"{type(e).__name__}: {str(e).strip()[:500]}"
    if info.num_frames < min_frames:
        return path, None, f"too short: {info.num_frames} frames < min_frames={min_frames}"
    row = {"num_frames": info.num_frames, "video_fps": round(info.fps, 6), "height": info.height,
           "width": info.width, "duration": round(info.duration, 6)}
    return path, row, None


def probe_files(
    entries: Sequence[ManifestEntry],
    workers: int = 8,
    decode_check: bool = True,
    backend: str = "auto",
    min_frames: int = 1,
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Probe every entry's file in a process pool -> (good rows, bad rows), both in input order.

    Good rows are the entry's fields (path, start, end, fps; None left out) plus num_frames, video_fps, height,
    width, duration. Bad rows are {"path", "error"}.
    """
    from tqdm.auto import tqdm

    jobs = [(e.path, decode_check, backend, min_frames) for e in entries]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_probe_one, jobs, chunksize=4), total=len(jobs), desc="probe",
                                disable=not progress))
    else:
        results = [_probe_one(j) for j in tqdm(jobs, desc="probe", disable=not progress)]
    good, bad = [], []
    for entry, (path, row, error) in zip(entries, results):
        if error is not None:
            bad.append({"path": path, "error": error})
        else:
            base = {k: v for k, v in asdict(entry).items() if v is not None}
            good.append({**base, **row})
    return good, bad
