#!/usr/bin/env python
"""Data loading throughput: decoded clips/s and frames/s, per worker, for the video path and the latent-cache path.

Video path: ``VideoDataset`` (decode with decord or PyAV, resize + crop) under a ``DataLoader`` with 0, 1, 2, 4 ...
workers. Cache path: the same clips written once to a latent cache (``LatentCacheWriter``; a cheap stand-in
encoder with the latent shape of an SD/FLUX-style VAE, so the number is about reading, not encoding), then read
back with ``CachedLatentDataset`` (stored as float16; returned as float32, or as stored). Without --folder, test
videos are written to a temporary folder first (640x360, 30 fps, 10 s, H.264 crf 23 with a keyframe every 2 s,
textured so that they cost about what real footage costs to decode).

    python benchmarks/dataloader.py                                  # generated videos, workers 0 1 2 4
    python benchmarks/dataloader.py --folder /data/videos --workers 0 4 8 16 --size 256 --num-frames 17
    python benchmarks/dataloader.py --json benchmarks/results/dataloader.json

Prints a table and writes the results (with the machine and the settings) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import av  # noqa: E402,F401  (before decord: see mardini/data/decode.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mardini.autoencoders.base import VideoAutoencoder  # noqa: E402
from mardini.data.counter_videos import write_test_video  # noqa: E402
from mardini.data.decode import decord_available  # noqa: E402
from mardini.data.latent_cache import CachedLatentDataset, LatentCacheWriter  # noqa: E402
from mardini.data.video import VideoDataConfig, VideoDataset  # noqa: E402


class StandInEncoder(VideoAutoencoder):
    """Pixels -> latents of a VAE's shape (C channels at 1/s resolution) by pooling and a fixed projection."""

    def __init__(self, channels: int = 16, compression: int = 8):
        super().__init__()
        self.latent_channels, self.spatial_compression = channels, compression
        self.register_buffer("proj", torch.randn(channels, 3, generator=torch.Generator().manual_seed(0)))

    def encode_frames(self, frames):
        return torch.einsum("nchw,kc->nkhw", F.avg_pool2d(frames, self.spatial_compression), self.proj)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="", help="videos to read (default: generate test videos)")
    p.add_argument("--num-videos", type=int, default=8, help="generated videos")
    p.add_argument("--video-size", default="640x360", help="generated videos: WIDTHxHEIGHT")
    p.add_argument("--video-seconds", type=float, default=10.0, help="generated videos: length")
    p.add_argument("--video-fps", type=float, default=30.0, help="generated videos: frame rate")
    p.add_argument("--gop", type=int, default=60, help="generated videos: frames between keyframes")
    p.add_argument("--crf", type=int, default=23, help="generated videos: H.264 rate factor")
    p.add_argument("--num-frames", type=int, default=16, help="T: frames per clip")
    p.add_argument("--size", type=int, default=256, help="clip height and width")
    p.add_argument("--fps", type=float, default=8.0, help="clip sampling rate")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=12, help="timed batches per setting (after warm-up)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--backends", nargs="+", default=["decord", "pyav"] if decord_available() else ["pyav"])
    p.add_argument("--decode-threads", type=int, default=1, help="decoder threads per worker")
    p.add_argument("--latent-channels", type=int, default=16, help="cache path: C of the stand-in latents")
    p.add_argument("--compression", type=int, default=8, help="cache path: spatial compression s")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of this process (workers=0 loads here; DataLoader workers always use 1)")
    p.add_argument("--skip-cache", action="store_true")
    p.add_argument("--json", default="dataloader_benchmark.json", help="where to write the results")
    return p.parse_args(argv)


def make_videos(folder: Path, args) -> None:
    """Write the test videos, several at a time."""
    from concurrent.futures import ProcessPoolExecutor

    width, height = (int(x) for x in args.video_size.lower().split("x"))
    frames = int(round(args.video_seconds * args.video_fps))
    jobs = [dict(path=folder / f"bench_{i:03d}.mp4", num_frames=frames, fps=args.video_fps, height=height, width=width,
                 gop=args.gop, texture=True, crf=args.crf) for i in range(args.num_videos)]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        for _ in pool.map(_write, jobs):
            pass


def _write(job: dict) -> None:
    write_test_video(**job)


def timed(dataset, workers: int, args, key: str) -> dict:
    """Clips/s over args.batches batches after max(workers, 1) warm-up batches (worker start-up excluded)."""
    warm = max(workers, 1)
    n_batches = max(args.batches, 4 * workers)  # well past what the workers prefetch during the warm-up
    total = (warm + n_batches) * args.batch_size
    order = np.random.default_rng(0).permutation(np.arange(total) % len(dataset)).tolist()
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=order, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
    batches = iter(loader)
    for _ in range(warm):
        next(batches)
    start = time.perf_counter()
    frames = 0
    for _ in range(n_batches):
        batch = next(batches)
        frames += batch[key].shape[0] * batch[key].shape[1]
    elapsed = time.perf_counter() - start
    del batches
    clips = n_batches * args.batch_size
    per = max(workers, 1)
    return {"workers": workers, "clips_per_s": clips / elapsed, "frames_per_s": frames / elapsed,
            "clips_per_s_per_worker": clips / elapsed / per, "frames_per_s_per_worker": frames / elapsed / per,
            "seconds": elapsed}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "av": av.__version__, "torch_threads": torch.get_num_threads()},
               "settings": vars(args), "video": [], "cache": []}
    if decord_available():
        import decord

        results["machine"]["decord"] = decord.__version__
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "videos"
        if not args.folder:
            start = time.perf_counter()
            make_videos(folder, args)
            print(f"wrote {args.num_videos} test videos ({args.video_size}, {args.video_seconds:g} s at "
                  f"{args.video_fps:g} fps, GOP {args.gop}) in {time.perf_counter() - start:.1f} s")
        base = dict(root=str(folder), num_frames=args.num_frames, height=args.size, width=args.size, fps=args.fps,
                    clip_start="random", crop="center", decode_threads=args.decode_threads)
        for backend in args.backends:
            dataset = VideoDataset(VideoDataConfig(**base, backend=backend))
            for workers in args.workers:
                row = {"path": "video", "backend": backend, **timed(dataset, workers, args, "video")}
                results["video"].append(row)
                print(_line(row), flush=True)
        if not args.skip_cache:
            dataset = VideoDataset(VideoDataConfig(**base, backend=args.backends[0]))
            cache_dir = Path(tmp) / "cache"
            writer = LatentCacheWriter(cache_dir, dataset, StandInEncoder(args.latent_channels, args.compression),
                                       lowres_factor=2, shard_size=64, dtype="float16")
            writer.write_meta()
            start = time.perf_counter()
            writer.run(batch_size=args.batch_size, num_workers=max(args.workers), progress=False)
            meta = writer.finalize()
            write_s = time.perf_counter() - start
            results["cache_write"] = {"items": len(dataset), "seconds": write_s, "clips_per_s": len(dataset) / write_s,
                                      "workers": max(args.workers), "shapes": meta["shapes"],
                                      "bytes_per_item": sum(p.stat().st_size for p in cache_dir.glob("shard_*"))
                                      / len(dataset)}
            print(f"cache write: {len(dataset)} clips in {write_s:.1f} s with {max(args.workers)} workers "
                  f"(z_hi {meta['shapes']['z_hi']}, {results['cache_write']['bytes_per_item'] / 1e6:.2f} MB/clip)")
            for label, dtype in (("fp16->fp32", torch.float32), ("fp16", None)):  # cast in the loader / on the GPU
                cached = CachedLatentDataset(cache_dir, dtype=dtype)
                for workers in args.workers:
                    row = {"path": "cache", "backend": label, **timed(cached, workers, args, "z_hi")}
                    results["cache"].append(row)
                    print(_line(row), flush=True)
    print()
    print(table(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {args.json}")
    return results


def _line(row: dict) -> str:
    return (f"{row['path']:>5} {row['backend']:>11} workers={row['workers']:<2} {row['clips_per_s']:8.1f} clips/s "
            f"{row['frames_per_s']:9.1f} frames/s ({row['clips_per_s_per_worker']:.1f} clips/s per worker)")


def table(results: dict) -> str:
    lines = ["| path | backend | workers | clips/s | frames/s | clips/s per worker | frames/s per worker |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in results["video"] + results["cache"]:
        lines.append(f"| {row['path']} | {row['backend']} | {row['workers']} | {row['clips_per_s']:.1f} | "
                     f"{row['frames_per_s']:.0f} | {row['clips_per_s_per_worker']:.1f} | "
                     f"{row['frames_per_s_per_worker']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
