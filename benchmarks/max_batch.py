r"""The largest micro-batch per GPU that trains, with and without activation checkpointing.

The real Trainer (same overrides as the run: FSDP, compile, EMA, optimizer) is built once per setting; its
train_step then runs on batches of a few sizes. Peak memory grows about linearly with the batch (activations), so
two measured sizes give the slope and the largest size predicted to fit under `--headroom` of the GPU's memory is
run (if it fits, the next size is tried to show it does not; on CPU, where memory is not measured, the size
doubles); then bisection between the largest fit and the smallest failure narrows the gap to 1/8 of the batch
(small sizes can mislead the slope: with activation checkpointing fixed buffers dominate them). Masks are those of
the curriculum's last stage (image-to-video: the most generated frames).

    torchrun --nproc_per_node 2 benchmarks/max_batch.py --json max_batch.json --ac 0,1 --sizes 2,4 -- \
        model=paper train=gpu train.parallel=fsdp ...

Out of memory in one process ends the try. With several processes it also ends the launch: the ranks do not run
out of memory at the same point (rank 0 holds a little more), so the others are left inside a collective that
never completes (measured: rank 1 waited in an FSDP all-gather for the whole 180 s process-group timeout). The rank
that ran out writes the JSON and exits with status 3 (EXIT_OUT_OF_MEMORY; torchrun itself then exits with 1), which
makes torchrun / accelerate stop the others at once; run the same command again and it goes on from the JSON
(`benchmarks/multi_gpu.py` does so while the JSON shows progress).
The JSON is rewritten after every try, so a launch cut short keeps what it found.
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
    """Two optimizer steps at micro-batch `size`: peak memory (the largest of any rank; 0 on CPU, where this script
    only smoke-tests) and the second step's time."""
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
    if dist.is_initialized() and dist.get_world_size() > 1:  # the largest over ranks: every rank records the same
        worst = torch.tensor([seconds, peak], device=trainer.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        seconds, peak = worst.tolist()
    return {"batch": size, "fits": True, "step_s": round(seconds, 3), "peak_mem_gib": round(peak, 2)}


EXIT_OUT_OF_MEMORY = 3  # a rank ran out of memory in a multi-process launch: run the same command again


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def logged(result: dict) -> dict:
    """Print each try as it ends (rank 0, or the rank that ran out of memory), so a run cut short by a time limit
    still tells what it found."""
    if rank() == 0 or not result["fits"]:
        print("try", json.dumps(result), flush=True)
    return result


def next_size(tries: list[dict], sizes: list[int], capacity_gib: float | None, headroom: float,
              max_extra: int, max_size: int) -> tuple[int | None, dict]:
    """The next micro-batch to try after `tries` (None: done) and the memory model behind it. First the listed
    sizes (below any known failure); then, while nothing has failed, the size predicted to fit from the last two
    fits' peak memory (GPU) or twice the largest fit (CPU); then bisection to within 1/8. At most `max_extra` tries
    beyond the listed sizes."""
    tried = {t["batch"] for t in tries}
    fits = sorted((t for t in tries if t["fits"]), key=lambda t: t["batch"])
    fail = min((t["batch"] for t in tries if not t["fits"]), default=None)
    for size in sizes:
        if size not in tried and (fail is None or size < fail):
            return size, {}
    if len(tried - set(sizes)) >= max_extra:
        return None, {}
    fit = fits[-1]["batch"] if fits else 0
    if fail is not None:
        return (None if fail - fit <= max(1, fit // 8) else (fit + fail) // 2), {}
    if fit >= max_size:
        return None, {}
    model = {}
    if capacity_gib and len(fits) >= 2 and fits[-1]["peak_mem_gib"] > fits[-2]["peak_mem_gib"]:
        (b0, m0), (b1, m1) = [(t["batch"], t["peak_mem_gib"]) for t in fits[-2:]]
        slope = (m1 - m0) / (b1 - b0)
        fixed = m1 - slope * b1
        predicted = int((headroom * capacity_gib - fixed) // slope)
        model = dict(gib_per_sample=round(slope, 2), gib_fixed=round(fixed, 2), predicted_max=predicted,
                     capacity_gib=round(capacity_gib, 1))
        size = max(predicted, fit + 1)
    else:
        size = 2 * max(fit, 1)
    return min(size, max_size), model


def probe(overrides: list[str], ac: bool, sizes: list[int], headroom: float, out_dir: str, max_extra: int,
          max_size: int, result: dict, save) -> dict:
    """Go on with `result` (this setting's tries so far, maybe from an earlier launch) until next_size says done;
    `save()` writes every setting's results (rank 0 after each try; the rank that runs out of memory, then exits)."""
    tries = result.setdefault("tries", [])
    cuda = torch.cuda.is_available()
    capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30 if cuda else None
    size, model = next_size(tries, sizes, capacity, headroom, max_extra, max_size)
    if size is not None:
        cfg = compose_config([*overrides, f"train.activation_checkpointing={str(ac).lower()}", "train.trackers=[]",
                              f"train.output_dir={out_dir}"])
        trainer = Trainer(cfg)
        trainer.step = cfg.train.max_steps - 1  # the curriculum's last stage: the most generated frames
        pool = [trainer.dataset[i] for i in range(4)]
        while size is not None:
            result.update(model)
            tries.append(logged(try_size(trainer, size, pool)))
            if not tries[-1]["fits"] and dist.is_initialized() and dist.get_world_size() > 1:
                tries[-1]["rank"] = rank()
                save()
                print(f"rank {rank()} ran out of memory at micro-batch {size}: the other ranks wait in a collective "
                      f"that will not complete, so this launch ends (exit status {EXIT_OUT_OF_MEMORY}); run the same "
                      f"command again to go on", flush=True)
                os._exit(EXIT_OUT_OF_MEMORY)  # torchrun / accelerate then stop the other ranks at once
            if rank() == 0:
                save()
            if dist.is_initialized() and dist.get_world_size() > 1:
                # No rank starts the next try before rank 0's file is written: a rank that then runs out of memory
                # saves after it, so its record is not overwritten by rank 0's older state (a race seen on CPU).
                dist.barrier()
            size, model = next_size(tries, sizes, capacity, headroom, max_extra, max_size)
        trainer.accelerator.free_memory()
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    fits = [t["batch"] for t in tries if t["fits"]]
    result.update(largest_fitting=max(fits) if fits else 0, done=True,
                  smallest_failing=min((t["batch"] for t in tries if not t["fits"]), default=None))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the run (after --)")
    p.add_argument("--ac", default="0,1", help="activation checkpointing settings to probe")
    p.add_argument("--sizes", default="2,4", help="micro-batches measured first (the last two give the slope)")
    p.add_argument("--headroom", type=float, default=0.97, help="fraction of the GPU's memory a prediction may use")
    p.add_argument("--bisections", type=int, default=8, help="most sizes tried beyond --sizes and the prediction")
    p.add_argument("--max-size", type=int, default=1024, help="largest micro-batch tried")
    p.add_argument("--timeout-s", type=int, default=180, help="process-group timeout")
    p.add_argument("--json", default="max_batch.json", help="results; an existing file of the same overrides is "
                   "continued (the next launch after an out-of-memory exit), --fresh starts over")
    p.add_argument("--fresh", action="store_true", help="ignore an existing --json")
    args = p.parse_args()
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per rank before the first collective (NCCL refuses a shared one)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=args.timeout_s))
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "world_size": world,
             "overrides": args.overrides, "results": []}
    if os.path.exists(args.json) and not args.fresh:
        with open(args.json) as f:
            previous = json.load(f)
        if previous.get("overrides") != args.overrides or previous.get("world_size") != world:
            p.error(f"{args.json} holds results of other overrides or another world size: pass --fresh or "
                    f"another --json")
        state = previous

    def save():
        tmp = f"{args.json}.rank{rank()}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, args.json)  # atomic: a rank stopped mid-write leaves the last whole file

    sizes = [int(s) for s in args.sizes.split(",")]
    for ac in [bool(int(a)) for a in args.ac.split(",")]:
        result = next((r for r in state["results"] if r["activation_checkpointing"] == ac), None)
        if result is None:
            result = {"activation_checkpointing": ac}
            state["results"].append(result)
        if result.get("done"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = tmp
            if dist.is_initialized():  # every rank must use the same folder
                holder = [tmp if rank() == 0 else None]
                dist.broadcast_object_list(holder)
                run_dir = holder[0]
            probe(args.overrides, ac, sizes, args.headroom, f"{run_dir}/probe_ac{int(ac)}", 2 + args.bisections,
                  args.max_size, result, save)
        if rank() == 0:
            print(json.dumps(result), flush=True)
            save()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
