#!/usr/bin/env python
"""FVD throughput: I3D features (videos/s) for N 16-frame videos, plus the Fréchet distance itself.

    python benchmarks/fvd.py                                  # 2048 videos, CUDA when present, random weights
    python benchmarks/fvd.py --weights ../shared/weights/i3d_pretrained_400.pt --batch-size 64 --dtype bfloat16
    python benchmarks/fvd.py --num-videos 64 --device cpu --out fvd_cpu.json

Stages timed separately (after warm-up, with device synchronisation):
  preprocess   uint8-level quantisation + resize of [B, 16, 3, S, S] videos to 224x224, on the device
  i3d          the network forward on preprocessed [B, 3, 16, 224, 224] clips
  end_to_end   I3DFeatureExtractor.__call__ on device-resident videos (preprocess + forward + copy to host)
  stats        FeatureStats.update on the features (float64, host)
  frechet      one 400-d Fréchet distance (scipy sqrtm)
Random weights give the same speed as the real ones; the FVD value printed with them means nothing. Videos are
random tensors made on the device, so decoding is not measured. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mardini.evaluation.fvd import FeatureStats, fvd_from_stats
from mardini.evaluation.i3d import I3DFeatureExtractor, InceptionI3d, num_parameters, preprocess_for_i3d

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = None
    for _ in range(repeats):
        out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-videos", type=int, default=2048)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--input-size", type=int, default=256, help="side of the generated videos before the resize")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="autocast dtype for the forward")
    p.add_argument("--weights", default=None, help="I3D weights file (default: random weights)")
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA")
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches")
    p.add_argument("--out", default="fvd_benchmark.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = DTYPES[args.dtype]
    if args.weights:
        extractor = I3DFeatureExtractor.from_file(args.weights, device=device, batch_size=args.batch_size,
                                                  autocast_dtype=autocast)
    else:
        extractor = I3DFeatureExtractor.random(device=device, batch_size=args.batch_size, autocast_dtype=autocast)
    net = extractor.network
    if args.channels_last:
        net.to(memory_format=torch.channels_last_3d)

    B, T, S = args.batch_size, args.num_frames, args.input_size
    gen = torch.Generator(device=device).manual_seed(0)
    videos = torch.rand(B, T, 3, S, S, device=device, generator=gen) * 2 - 1
    x = preprocess_for_i3d(videos)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return net.features(x) if isinstance(net, InceptionI3d) else net(x)

    num_batches = max(1, -(-args.num_videos // B))
    for _ in range(args.warmup):
        forward()
        extractor(videos)
    t_pre, _ = timed(lambda: preprocess_for_i3d(videos), device, num_batches)
    t_net, _ = timed(forward, device, num_batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = FeatureStats()
    t_e2e, feats = timed(lambda: extractor(videos), device, num_batches)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    t_stats, _ = timed(lambda: stats.update(feats), torch.device("cpu"), num_batches)
    other = FeatureStats.of(np.random.default_rng(0).normal(size=(1024, feats.shape[1])))  # a full-rank set
    t_fd, fvd = timed(lambda: fvd_from_stats(stats, other), torch.device("cpu"), 1)

    n = num_batches * B
    rows = [("preprocess", t_pre, n / t_pre), ("i3d", t_net, n / t_net), ("end_to_end", t_e2e, n / t_e2e),
            ("stats", t_stats, n / t_stats), ("frechet", t_fd, None)]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "num_videos": n, "num_frames": T, "input_size": S, "batch_size": B,
        "dtype": args.dtype, "channels_last": args.channels_last, "tf32": args.tf32,
        "weights": args.weights or "random", "params": num_parameters(net) if isinstance(net, InceptionI3d) else None,
        "peak_memory_gib": peak,
        "stages": {name: {"seconds": sec, "videos_per_s": vps} for name, sec, vps in rows},
        "fvd_of_random_sets": fvd,
    }
    print(f"FVD throughput on {result['device']} (torch {torch.__version__}): {n} videos x {T} frames, "
          f"{S}x{S} -> 224x224, batch {B}, {args.dtype}{', channels_last' if args.channels_last else ''}")
    print(f"| {'stage':<11} | {'seconds':>9} | {'videos/s':>10} |")
    print(f"|{'-' * 13}|{'-' * 11}|{'-' * 12}|")
    for name, sec, vps in rows:
        print(f"| {name:<11} | {sec:9.3f} | {vps:10.1f} |" if vps else f"| {name:<11} | {sec:9.3f} | {'':>10} |")
    if peak is not None:
        print(f"peak GPU memory (end_to_end): {peak:.2f} GiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
