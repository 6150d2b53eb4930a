"""Where a training step's GPU time goes: attention kernels, matmuls, everything else, and idle gaps.

    python benchmarks/profile_step.py --part generator --compile 1

Runs a few steps of benchmarks/train_step.py's setup under torch.profiler and groups CUDA kernel time by name.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from train_step import build_step  # benchmarks/train_step.py (the script's folder is on sys.path)

GROUPS = [("attention", r"fmha|flash|attention|sdpa|cudnn"), ("matmul", r"gemm|xmma|cutlass|nvjet|wgmma|matmul"),
          ("optimizer", r"adam|foreach|multi_tensor"), ("triton (fused elementwise)", r"triton"),
          ("other", r".")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", default="generator", choices=("planner", "generator", "joint"))
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--lowres", type=int, default=4)
    p.add_argument("--size", default="paper", help="model size (mardini/models/config.py MODEL_SIZES)")
    p.add_argument("--out", default="profile.json")
    args = p.parse_args()
    step, _, _ = build_step(args, args.part, bool(args.compile), kernel="cudnn")

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / steps
    totals = {name: 0.0 for name, _ in GROUPS}
    kernels = {}
    for evt in prof.key_averages():
        # Kernels only: a user annotation on the GPU timeline (e.g. "Optimizer.step#AdamW.step") spans kernels that
        # are listed themselves, and counting both would double their time.
        if evt.device_type != torch.autograd.DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
            continue
        us = evt.self_device_time_total / steps
        kernels[evt.key] = us
        for name, pattern in GROUPS:
            if re.search(pattern, evt.key, re.IGNORECASE):
                totals[name] += us / 1e3
                break
    busy = sum(totals.values())
    report = {"part": args.part, "compile": bool(args.compile), "wall_ms": wall_ms, "busy_ms": busy,
              "idle_ms": wall_ms - busy, "groups_ms": totals,
              "top_kernels_us": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15])}
    json.dump(report, open(args.out, "w"), indent=1)
    print(f"{args.part} compile={bool(args.compile)}: step {wall_ms:.1f} ms, kernels {busy:.1f} ms, "
          f"idle {wall_ms - busy:.1f} ms")
    for name, ms in totals.items():
        print(f"  {name:28s} {ms:8.1f} ms  {ms / wall_ms:6.1%}")


if __name__ == "__main__":
    main()
