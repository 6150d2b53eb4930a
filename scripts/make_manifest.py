#!/usr/bin/env python
"""Probe a folder (or an existing manifest) of videos and write a manifest of the good ones.

Every file is opened in a process pool: frame count, fps, size and duration come from the container (PyAV), and
the first and last frames are decoded (decord, PyAV as the fallback) so that truncated files are caught here
rather than during training. Good files go to the manifest (path, the input's start/end/fps if any, and
num_frames, video_fps, height, width, duration); bad ones, with the reason, to a separate file.

    python scripts/make_manifest.py /data/videos manifest.csv --workers 16
    python scripts/make_manifest.py /data/videos manifest.jsonl --min-frames 17 --bad bad.jsonl
    python scripts/make_manifest.py old_manifest.csv new_manifest.csv --no-decode-check

Paths are written absolute; ``--relative`` writes them relative to the output manifest's folder instead (a
manifest that moves together with its videos). Either way the manifest reads the same from any working folder
(the loader resolves a relative path against the manifest's folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from mardini.cli import ArgumentParser  # noqa: E402
from mardini.data.manifest import (  # noqa: E402
    MANIFEST_SUFFIXES,
    VIDEO_EXTENSIONS,
    ManifestEntry,
    probe_files,
    read_manifest,
    scan_folder,
    write_manifest,
)


def parse_args(argv=None) -> argparse.Namespace:
    """The options, and args.entries: the files to probe. A mistake is one line (exit status 2) before any file is
    probed, which can take hours, rather than a traceback after."""
    p = ArgumentParser(prog="make_manifest.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a folder of videos (scanned recursively) or a .csv / .jsonl manifest")
    p.add_argument("output", help="the manifest to write (.csv or .jsonl)")
    p.add_argument("--bad", default=None, help="where to list bad files (default: <output stem>.bad.jsonl)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="probing processes")
    p.add_argument("--extensions", nargs="+", default=list(VIDEO_EXTENSIONS), help="folder scan: file suffixes")
    p.add_argument("--min-frames", type=int, default=1, help="files with fewer frames are listed as bad")
    p.add_argument("--no-decode-check", action="store_true", help="metadata only: do not decode first/last frames")
    p.add_argument("--backend", default="auto", choices=("auto", "decord", "pyav"), help="decoder for the check")
    p.add_argument("--relative", action="store_true", help="write paths relative to the output's folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    source, formats = Path(args.source), " or ".join(MANIFEST_SUFFIXES)
    for name, path in (("output", args.output), ("--bad", args.bad or ".bad.jsonl")):
        suffix = Path(path).suffix
        if suffix.lower() not in MANIFEST_SUFFIXES:
            p.error(f"{name} {path}: a manifest's name ends in {formats} (its format)"
                    + (f", not {suffix}" if suffix else ""))
    if not source.exists():
        p.error(f"source {source}: no such folder or manifest")
    if source.is_file() and source.suffix.lower() not in MANIFEST_SUFFIXES:
        p.error(f"source {source}: give a folder of videos or a {formats} manifest")
    try:
        args.entries = ([ManifestEntry(f) for f in scan_folder(source, args.extensions)] if source.is_dir()
                        else read_manifest(source))
    except (OSError, ValueError) as e:  # an unreadable manifest: its message names it
        p.error(str(e))
    return args


def main(argv=None) -> tuple[list[dict], list[dict]]:
    args = parse_args(argv)
    output, entries = Path(args.output), args.entries
    start = time.perf_counter()
    good, bad = probe_files(entries, workers=args.workers, decode_check=not args.no_decode_check,
                            backend=args.backend, min_frames=args.min_frames, progress=not args.quiet)
    base = output.resolve().parent
    for row in good:  # a path relative to the working folder would be read against the manifest's folder
        path = Path(row["path"]).resolve()
        row["path"] = os.path.relpath(path, base) if args.relative else str(path)
    write_manifest(output, good)
    bad_path = Path(args.bad) if args.bad else output.with_name(output.stem + ".bad.jsonl")
    write_manifest(bad_path, bad)
    hours = sum(row["duration"] for row in good) / 3600
    print(f"{len(good)} good videos ({hours:.2f} h) -> {output}; {len(bad)} bad -> {bad_path} "
          f"[{time.perf_counter() - start:.1f} s]")
    for row in bad[:10]:
        print(f"  bad: {row['path']}: {row['error']}")
    return good, bad


if __name__ == "__main__":
    main()
