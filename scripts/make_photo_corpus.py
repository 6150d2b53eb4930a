#!/usr/bin/env python
"""Write the photo-motion corpus: mp4 clips of camera moves and cut-outs over real photographs, plus manifests.

No download: the photographs ship with scikit-image (mardini/data/photo_motion.py renders the clips). Training
clips use only the training photographs, validation clips only the validation ones (photo_motion.TRAIN_PHOTOS /
VAL_PHOTOS), for the background and for every cut-out layer.

    python scripts/make_photo_corpus.py data/photo_motion
    mardini-train experiment=small_photo_motion        # or data=photo_motion with groups of your choice

writes OUT_DIR/train/000000.mp4 ..., OUT_DIR/val/000000.mp4 ..., the manifests OUT_DIR/train.csv and
OUT_DIR/val.csv (a 'path' column relative to OUT_DIR, plus photo, layers, motion, easing, num_frames, video_fps,
height, width for people and tools), and OUT_DIR/corpus.json (the arguments and the photograph split).
Clip (split, i) depends only on (--seed, split, i), so the same arguments give the same corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from mardini.data import photo_motion  # noqa: E402
from mardini.data.manifest import write_manifest  # noqa: E402
from mardini.data.video_io import write_video  # noqa: E402

OWN_NAMES = ("train", "val", "train.csv", "val.csv", "corpus.json")  # what --overwrite replaces


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder to write (must be empty or absent unless --overwrite)")
    p.add_argument("--num-train", type=int, default=600, help="training clips")
    p.add_argument("--num-val", type=int, default=64, help="validation clips")
    p.add_argument("--size", type=int, default=128, help="frame height and width in pixels")
    p.add_argument("--frames", type=int, default=48, help="frames per clip")
    p.add_argument("--fps", type=int, default=8, help="frame rate written into the files")
    p.add_argument("--seed", type=int, default=0, help="with the split and the index, the only randomness")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (the result does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier corpus in out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for key, low in (("num_train", 1), ("num_val", 1), ("size", 16), ("frames", 2), ("fps", 1), ("workers", 1)):
        if getattr(args, key) < low:
            p.error(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    return args


def _write_one(job: tuple) -> dict:
    """(out_dir, split, index, seed, size, frames, fps) -> the clip's manifest row. Top-level: picklable."""
    out_dir, split, index, seed, size, frames, fps = job
    clip = photo_motion.render_clip(seed, index, split, size, size, frames)
    rel = f"{split}/{index:06d}.mp4"
    write_video(Path(out_dir) / rel, clip.frames, fps=fps)
    return {"path": rel, "photo": clip.photos[0], "layers": "+".join(clip.photos[1:]), "motion": clip.motion,
            "easing": clip.easing, "num_frames": frames, "video_fps": fps, "height": size, "width": size}


def _prepare(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless --overwrite; then remove only an earlier corpus's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"error: {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise SystemExit(f"error: {out_dir} is not empty; pass --overwrite to replace the corpus in it")
        for name in OWN_NAMES:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the ffmpeg encoders)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv=None) -> dict:
    """Write the corpus; returns a summary (counts, seconds, bytes)."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    _prepare(out_dir, args.overwrite)
    jobs = [(str(out_dir), split, i, args.seed, args.size, args.frames, args.fps)
            for split, n in (("train", args.num_train), ("val", args.num_val)) for i in range(n)]
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    bar = dict(total=len(jobs), desc="photo clips", unit="clip", disable=args.quiet)
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            rows = list(tqdm(pool.imap(_write_one, jobs, chunksize=4), **bar))
    else:
        rows = [_write_one(job) for job in tqdm(jobs, **bar)]
    for split in ("train", "val"):
        write_manifest(out_dir / f"{split}.csv", [r for r in rows if r["path"].startswith(split + "/")])
    info = {k: v for k, v in vars(args).items() if k not in ("out_dir", "overwrite", "quiet", "workers")}
    info.update(train_photos=list(photo_motion.TRAIN_PHOTOS), val_photos=list(photo_motion.VAL_PHOTOS))
    (out_dir / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")

    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    summary = {"train": args.num_train, "val": args.num_val, "seconds": time.perf_counter() - start,
               "cpu_seconds": _cpu_seconds() - cpu_start, "bytes": size}
    print(f"wrote {args.num_train} training + {args.num_val} validation clips ({args.size}x{args.size}, "
          f"{args.frames} frames at {args.fps} fps) to {out_dir}: {size / 1e6:.1f} MB in {summary['seconds']:.0f} s "
          f"({summary['cpu_seconds']:.0f} CPU s; "
          f"manifests {out_dir / 'train.csv'}, {out_dir / 'val.csv'})")
    return summary


if __name__ == "__main__":
    main()
