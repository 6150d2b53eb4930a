"""Where the real training loop loses GPU time: busy vs idle over a window of steps, and the host syncs behind it.

    python benchmarks/profile_train_loop.py experiment=small_synthetic --skip 80 --steps 20 --json loop.json

Runs `mardini.train`'s Trainer (data loading, masks, motion estimate, EMA, logging included) for --skip + --steps
optimizer steps and profiles the last --steps with torch.profiler. Reports the wall time per step, the GPU's busy
time per step (the union of kernel and copy intervals) and so its idle share, the CUDA kernel time by group, and the
host-side calls that wait for the GPU (synchronisations, .item(), .nonzero() ...) with their counts: each is a point
where the host stops queueing work, so the GPU idles while the host catches up.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time

import torch

from mardini.cli import compose_config
from mardini.training.trainer import Trainer

GROUPS = [("attention", r"fmha|flash|attention|sdpa|cudnn"), ("matmul", r"gemm|xmma|cutlass|nvjet|wgmma|matmul"),
          ("optimizer / EMA", r"adam|foreach|multi_tensor|lerp"), ("triton (fused elementwise)", r"triton"),
          ("other (eager elementwise, copies, the motion matcher)", r".")]
SYNC_OPS = r"Synchronize|aten::item|_local_scalar_dense|aten::nonzero|aten::is_nonzero|cudaMemcpy\b"


def busy_us(events) -> float:
    """Union length (us) of [start, end) intervals of device events."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, cur_start, cur_end = 0.0, None, None
    for s, e in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. experiment=small_synthetic)")
    p.add_argument("--skip", type=int, default=80, help="steps before the profiled window (compilation, warm-up)")
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.skip < 2 or args.steps < 1:
        p.error("--skip must be >= 2 and --steps >= 1")
    out_dir = tempfile.mkdtemp(prefix="profile_loop_")
    total = args.skip + args.steps
    cfg = compose_config([*args.overrides, f"train.max_steps={total}", "train.eval_every=0", "train.sample_every=0",
                          f"train.checkpoint_every={10 * total}", "train.trackers=[]", "train.progress=false",
                          "train.num_sample_videos=1", f"train.output_dir={out_dir}"])
    trainer = Trainer(cfg)
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        schedule=torch.profiler.schedule(wait=args.skip - 1, warmup=1, active=args.steps, repeat=1))
    step_fn, marks = trainer.train_step, {}

    def profiled_step(batches):
        result = step_fn(batches)
        done = trainer.step + 1  # the trainer increments after this returns
        if done in (args.skip, total):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[done] = time.perf_counter()
        prof.step()
        return result

    trainer.train_step = profiled_step
    with prof:
        trainer.fit()
    shutil.rmtree(out_dir, ignore_errors=True)  # the run itself (checkpoint, export) is not the point
    wall_ms = (marks[total] - marks[args.skip]) / args.steps * 1e3
    events = prof.events()
    # Kernels, copies and memsets only: user annotations (ProfilerStep#, compiled regions) also appear as device
    # events, spanning whole steps.
    device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                     and not getattr(e, "is_user_annotation", False)]
    busy_ms = busy_us(device_events) / args.steps / 1e3
    groups = {name: 0.0 for name, _ in GROUPS}
    kernels = sorted(((e.self_device_time_total / args.steps / 1e3, e.key) for e in prof.key_averages()
                      if e.device_type == torch.autograd.DeviceType.CUDA
                      and not getattr(e, "is_user_annotation", False)), reverse=True)
    for ms, key in kernels:
        for name, pattern in GROUPS:
            if re.search(pattern, key, re.IGNORECASE):
                groups[name] += ms
                break
    syncs = {e.key: e.count / args.steps for e in prof.key_averages()
             if e.device_type == torch.autograd.DeviceType.CPU and re.search(SYNC_OPS, e.key)}
    result = {"overrides": args.overrides, "steps": args.steps, "wall_ms_per_step": wall_ms,
              "gpu_busy_ms_per_step": busy_ms, "gpu_idle_share": max(0.0, 1 - busy_ms / wall_ms),
              "kernel_ms_per_step": groups, "top_kernels_ms_per_step": [[round(ms, 3), key[:120]] for ms, key in
                                                                        kernels[:30]],
              "host_waits_per_step": syncs,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
