r"""Prototype: where the host spends a training step, and whether compiling more of the model or CUDA graphs help.

    python benchmarks/prototypes/loop_overhead.py model=small data=synthetic_large train=gpu \
        --scope block --mode default --steps 200 --json out.json

Runs the real Trainer and times, on the host and without extra synchronisation, each phase of a step: preparing
the next micro-batch (data, per-sample draws), launching the forward, launching the backward, the gradient norm
(split into launching it and waiting for its value: the step's one wait for the GPU), the optimizer, the EMA and
the loop's bookkeeping. A step whose wait is near zero is host-bound: the GPU finished before the host asked.

With train.compile=true (the `gpu` train preset), what is compiled: --scope block: each transformer block (the
trainer's way); nets: the planner's and the generator's whole forward (the glue around the blocks included); model:
MarDini.forward whole (on the H200 its first compilation took 2 minutes; BENCHMARKS.md). --mode: torch.compile's
mode (default | reduce-overhead: CUDA graphs, measured slower for training | max-autotune-no-cudagraphs).
Steps are timed over the second half of the run; host_ms_per_step's phases add up to ms_per_step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict

import torch

import mardini.training.parallel as parallel
import mardini.training.trainer as trainer_module
from mardini.cli import compose_config


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--scope", default="block", choices=["block", "nets", "model", "none"])
    p.add_argument("--mode", default="default")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default="")
    args = p.parse_args()

    def apply_compile(model, motion=True, **kwargs):
        kwargs = {} if args.mode == "default" else {"mode": args.mode}
        if args.scope == "block":
            for block in parallel.transformer_blocks(model):
                block.compile(**kwargs)
        elif args.scope == "nets":
            model.planner.compile(**kwargs)
            model.generator.compile(**kwargs)
        elif args.scope == "model":
            model.compile(**kwargs)
        if motion and args.scope != "none":
            model.compile_motion(**kwargs)

    parallel.apply_compile = apply_compile
    out_dir = tempfile.mkdtemp(prefix="loop_overhead_")
    cfg = compose_config([*args.overrides, f"train.max_steps={args.steps}", "train.eval_every=0",
                          "train.sample_every=0", f"train.checkpoint_every={10 * args.steps}", "train.trackers=[]",
                          "train.progress=false", "train.num_sample_videos=1", f"train.output_dir={out_dir}"])
    trainer = trainer_module.Trainer(cfg)
    phases, current = defaultdict(float), {"on": False}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if current["on"]:
                    phases[name] += time.perf_counter() - start
        return wrapper

    # The gradient norm: its launch, and (where the step reads it at once) the wait for the GPU.
    launch_norm = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = timed("grad norm (launch)", launch_norm)
    trainer_module.clip_grad_norm = timed("grad norm (launch + read)", trainer_module.clip_grad_norm)
    if hasattr(trainer, "_finish"):  # a trainer that reads a step's numbers one step late
        trainer._finish = timed("finish previous step (read its norm, EMA)", trainer._finish)
    trainer._prepare = timed("prepare next batch", trainer._prepare)
    trainer._micro_step = timed("forward", trainer._micro_step)
    trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)
    trainer.optimizer.step = timed("optimizer", trainer.optimizer.step)
    trainer.ema.update = timed("ema", trainer.ema.update)
    step_fn, marks = trainer.train_step, {}
    first = args.steps // 2

    def step(batches):
        start = time.perf_counter()
        result = step_fn(batches)
        done = trainer.step + 1
        if current["on"]:
            phases["train_step"] += time.perf_counter() - start
        if done == first:
            current["on"], marks["start"] = True, time.perf_counter()
        if done == args.steps:
            current["on"], marks["end"] = False, time.perf_counter()
        return result

    trainer.train_step = step
    t0 = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    n = args.steps - first
    wall = (marks["end"] - marks["start"]) / n * 1e3
    per_step = {k: round(v / n * 1e3, 2) for k, v in phases.items()}
    inside = per_step.pop("train_step")
    nested = {"grad norm (launch)"} | ({"ema"} if "finish previous step (read its norm, EMA)" in per_step else set())
    named = sum(v for k, v in per_step.items() if k not in nested)
    per_step["train_step, other"] = round(inside - named, 2)
    per_step["loop bookkeeping"] = round(wall - inside, 2)
    per_step["grad norm (read)"] = round(per_step.pop("grad norm (launch + read)") - per_step["grad norm (launch)"], 2)
    result = {"overrides": args.overrides, "scope": args.scope, "mode": args.mode, "steps": args.steps,
              "ms_per_step": round(wall, 2), "steps_per_s": round(1e3 / wall, 3),
              "host_ms_per_step": per_step,
              "host_busy_ms_per_step": round(wall - per_step["grad norm (read)"], 2),
              "run_s": round(total, 1),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
