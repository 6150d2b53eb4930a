#!/usr/bin/env python
"""Pre-emption probe: interrupt a training run again and again, resume it each time, and check that it ends where
an uninterrupted run ends.

    python scripts/preemption_probe.py --out /tmp/probe                      # SIGTERM to the process group, 4 times
    python scripts/preemption_probe.py --out /tmp/probe --signal KILL         # kill -9 instead
    python scripts/preemption_probe.py --out /tmp/probe -- model=small train.cpu=false   # extra mardini-train overrides

Every attempt is `mardini-train ... train.resume=auto` in its own process group with DataLoader workers. After a
few new steps appear in metrics.jsonl it signals the whole group, as `timeout`, SLURM and Kubernetes do (TERM), or
kills it (KILL). Expected: exit status 75 after SIGTERM (checkpoint at the step reached), -9 after SIGKILL; then
the final export and every logged loss equal those of an uninterrupted run, each step logged once (bit for bit on
CPU; GPU kernels may differ in the last bits). Takes a few CPU minutes with the defaults. The fast version of one
SIGTERM round is tests/test_reliability.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PREEMPTED_EXIT_CODE = 75  # mardini.training.trainer.PREEMPTED_EXIT_CODE (not imported: keeps this script light)


def steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def command(run: Path, args, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "mardini.train", "curriculum=interpolation", "train.trackers=[]",
            "train.progress=false", "train.num_sample_videos=1", "train.sample_steps=2",
            f"train.max_steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}",
            f"data.num_workers={args.workers}", "train.resume=auto", f"hydra.run.dir={run}", *extra]


def attempt(run: Path, args, extra: list[str], log, stop_after: int | None) -> int:
    """One mardini-train process; signal its group once `stop_after` steps are logged. Returns its exit status."""
    proc = subprocess.Popen(command(run, args, extra), start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        while stop_after is not None and proc.poll() is None and steps_logged(run) < stop_after:
            time.sleep(0.05)
        if proc.poll() is None and stop_after is not None:
            os.killpg(proc.pid, getattr(signal, f"SIG{args.signal}"))
        return proc.wait(timeout=args.timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r["step"] for r in records]
    if len(steps) != len(set(steps)):
        raise SystemExit(f"FAIL: {run}/metrics.jsonl holds a step twice")
    return {r["step"]: r["loss"] for r in records}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the interrupted and the reference run")
    p.add_argument("--interruptions", type=int, default=4)
    p.add_argument("--signal", default="TERM", choices=("TERM", "KILL", "INT"))
    p.add_argument("--steps", type=int, default=40, help="train.max_steps")
    p.add_argument("--checkpoint-every", type=int, default=5, help="train.checkpoint_every (what KILL falls back to)")
    p.add_argument("--workers", type=int, default=2, help="data.num_workers")
    p.add_argument("--timeout", type=float, default=600, help="seconds an attempt may take after the signal")
    p.add_argument("--seed", type=int, default=0, help="of the random interruption points")
    p.add_argument("extra", nargs="*", help="more mardini-train overrides (after --)")
    args = p.parse_args(argv)
    out = Path(args.out)
    run, reference = out / "interrupted", out / "reference"
    if run.exists() or reference.exists():
        raise SystemExit(f"{out} already holds a probe: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    expected = {"TERM": PREEMPTED_EXIT_CODE, "KILL": -signal.SIGKILL, "INT": None}[args.signal]
    failures = 0
    with open(out / "probe.log", "ab") as log:
        for i in range(args.interruptions):
            start = steps_logged(run)
            stop_after = start + int(rng.integers(1, 6))
            if stop_after >= args.steps:
                break
            code = attempt(run, args, args.extra, log, stop_after)
            checkpoints = sorted(x.name for x in (run / "checkpoints").glob("step_*")) if run.exists() else []
            ok = code == expected or expected is None
            failures += not ok
            print(f"attempt {i + 1}: SIG{args.signal} after step {stop_after}, exit status {code}"
                  f"{'' if ok else f' (expected {expected})'}, checkpoints {checkpoints}")
        code = attempt(run, args, args.extra, log, None)
        print(f"final attempt: exit status {code}")
        failures += code != 0
        code = attempt(reference, args, args.extra, log, None)
        print(f"reference run: exit status {code}")
        failures += code != 0

    from safetensors.torch import load_file

    a, b = (load_file(str(folder / "export" / "model.safetensors")) for folder in (run, reference))
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    la, lb = losses(run), losses(reference)
    same_losses = la == lb
    print(f"export: max |difference| {worst:.3g}; logged losses {'identical' if same_losses else 'DIFFER'} "
          f"({len(la)} and {len(lb)} steps)")
    failures += worst != 0 or not same_losses
    print("PASS" if failures == 0 else f"FAIL ({failures} problems; output in {out / 'probe.log'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
