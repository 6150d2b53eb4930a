"""The largest micro-batch per GPU that trains, with and without activation checkpointing.

The real Trainer (same overrides as the run: FSDP, compile, EMA, optimizer) is built once per setting; its
train_step then runs on batches of a few sizes. Peak memory grows about linearly with the batch (activations), so
two measured sizes give the slope and the largest size predicted to fit under `--headroom` of the GPU's memory is
run (if it fits, the next size is tried to show it does not); then bisection between the largest fit and the
smallest failure narrows the gap to 1/8 of the batch (small sizes can mislead the slope: with activation
checkpointing fixed buffers dominate them). Out of memory ends a try, not the setting; the Trainer is rebuilt for
the next setting. Masks are those of the curriculum's last stage (image-to-video: the most generated frames).

    torchrun --nproc_per_node 2 benchmarks/max_batch.py --json max_batch.json --ac 0,1 --sizes 2,4 -- \\
        model=paper train=gpu train.parallel=fsdp ...

Every rank runs the same shapes, so an out-of-memory error happens on all ranks at the same step (a process group
timeout of --timeout-s turns a rank left waiting into an error rather than a hang).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from mardini.cli import compose_config
from mardini.training.trainer import Trainer


def batch_of(trainer: Trainer, size: int, pool: list[dict]) -> dict:
    videos = torch.stack([pool[i % len(pool)]["video"] for i in range(size)])
    start = trainer.layout.rank * size
    return {"video": videos, "position": torch.arange(start, start + size)}


def try_size(trainer: Trainer, size: int, pool: list[dict]) -> dict:
    """Two optimizer steps at micro-batch `size`: peak memory (this rank; 0 on CPU, where this script only
    smoke-tests) and the second step's time."""
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    batch = batch_of(trainer, size, pool)
    try:
        trainer.train_step(iter([batch]))
        sync()
        start = time.perf_counter()
        trainer.train_step(iter([batch]))
        sync()
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return {"batch": size, "fits": False}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"batch": size, "fits": True, "step_s": round(seconds, 3), "peak_mem_gib": round(peak, 2)}


def logged(result: dict) -> dict:
    """Print each try as it ends (rank 0), so a run cut short by a time limit still tells what it found."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("try", json.dumps(result), flush=True)
    return result


def probe(overrides: list[str], ac: bool, sizes: list[int], headroom: float, out_dir: str,
          max_bisections: int = 8) -> dict:
    cfg = compose_config([*overrides, f"train.activation_checkpointing={str(ac).lower()}", "train.trackers=[]",
                          f"train.output_dir={out_dir}"])
    trainer = Trainer(cfg)
    trainer.step = cfg.train.max_steps - 1  # the curriculum's last stage: the most generated frames
    pool = [trainer.dataset[i] for i in range(4)]
    tries = [logged(try_size(trainer, s, pool)) for s in sizes]
    result = {"activation_checkpointing": ac, "tries": tries}
    fitted = [t for t in tries if t["fits"]]
    if len(fitted) >= 2 and trainer.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        (b0, m0), (b1, m1) = [(t["batch"], t["peak_mem_gib"]) for t in fitted[-2:]]
        slope = (m1 - m0) / (b1 - b0)
        fixed = m1 - slope * b1
        predicted = int((headroom * capacity - fixed) // slope)
        result.update(gib_per_sample=round(slope, 2), gib_fixed=round(fixed, 2), predicted_max=predicted,
                      capacity_gib=round(capacity, 1))
        size = max(predicted, max(sizes) + 1)
        tries.append(logged(try_size(trainer, size, pool)))
        if tries[-1]["fits"]:  # a right prediction: the next size must fail
            tries.append(logged(try_size(trainer, size + 1, pool)))
        # The memory slope from two small sizes can be far off (e.g. with activation checkpointing, where fixed
        # buffers dominate them): bisect between the largest fit and the smallest failure, to within 1/8.
        for _ in range(max_bisections):
            fit = max(t["batch"] for t in tries if t["fits"])
            fail = min((t["batch"] for t in tries if not t["fits"]), default=None)
            if fail is None or fail - fit <= max(1, fit // 8):
                break
            tries.append(logged(try_size(trainer, (fit + fail) // 2, pool)))
    fits = [t["batch"] for t in tries if t["fits"]]
    result["largest_fitting"] = max(fits) if fits else 0
    result["smallest_failing"] = min((t["batch"] for t in tries if not t["fits"]), default=None)
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the run (after --)")
    p.add_argument("--ac", default="0,1", help="activation checkpointing settings to probe")
    p.add_argument("--sizes", default="2,4", help="micro-batches measured first (the last two give the slope)")
    p.add_argument("--headroom", type=float, default=0.97, help="fraction of the GPU's memory a prediction may use")
    p.add_argument("--bisections", type=int, default=8, help="most extra sizes tried to narrow the gap")
    p.add_argument("--timeout-s", type=int, default=180, help="process-group timeout")
    p.add_argument("--json", default="max_batch.json")
    args = p.parse_args()
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per rank before the first collective (NCCL refuses a shared one)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=args.timeout_s))
    results = []
    for ac in [bool(int(a)) for a in args.ac.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = tmp if not dist.is_initialized() else None
            if dist.is_initialized():  # every rank must use the same folder
                holder = [tmp if dist.get_rank() == 0 else None]
                dist.broadcast_object_list(holder)
                run_dir = holder[0]
            results.append(probe(args.overrides, ac, [int(s) for s in args.sizes.split(",")], args.headroom,
                                 f"{run_dir}/probe_ac{int(ac)}", args.bisections))
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(results[-1]), flush=True)
            with open(args.json, "w") as f:
                device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
                json.dump({"device": device, "world_size": dist.get_world_size()
                           if dist.is_initialized() else 1, "overrides": args.overrides, "results": results}, f,
                          indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
