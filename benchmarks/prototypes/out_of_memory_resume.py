"""A real CUDA out-of-memory error mid-run, then the run resumed at a smaller micro-batch (GPU check of the trainer's
out-of-memory checkpoint; the CPU test simulates the error: tests/test_training.py, `out_of_memory`).

    python benchmarks/prototypes/out_of_memory_resume.py --out results/ [--fail-at 8] [hydra overrides]

Three launches of `mardini.train` in one process each: (1) the run uninterrupted; (2) the same run in which training
step --fail-at runs out of device memory for real (a blocker tensor takes all but --leave-gib of the free memory
just before the step; the failing step's frames hold it, as they hold its activations); (3) launch 2 resumed with
`train.resume=auto`, half the micro-batch and twice the accumulation (the same global batch: the same samples,
masks and noise). Writes --out/out_of_memory_resume.json: each launch's exit status and error line, the checkpoints
launch 2 left, and the losses of launches 1 and 3 over the resumed steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# mardini-train with one training step made to run out of device memory (argv: fail-at, leave-gib, overrides...)
FAILING_RUN = """
import sys
import torch
from mardini.cli import train_main
from mardini.training.trainer import Trainer

fail_at, leave = int(sys.argv.pop(1)), float(sys.argv.pop(1))
real = Trainer.train_step

def train_step(self, batches):
    if self.step + 1 == fail_at:  # all but `leave` GiB taken: this step's own allocations fail
        torch.cuda.empty_cache()  # else the step reuses the blocks the allocator keeps from earlier steps
        free, _ = torch.cuda.mem_get_info(self.device)
        blocker = torch.empty(int(free - leave * 2**30), dtype=torch.uint8, device=self.device)
    return real(self, batches)

Trainer.train_step = train_step
sys.argv = ["mardini-train", *sys.argv[1:]]
train_main()
"""

DEFAULTS = ["model=small", "data=synthetic_large", "train=gpu", "train.max_steps=12", "train.warmup_steps=2",
            "train.log_every=1", "train.checkpoint_every=100", "train.eval_every=0", "train.sample_every=0",
            "train.num_sample_videos=1", "train.sample_steps=2", "train.trackers=[]", "train.progress=false"]


def launch(args: list[str], script: str | None = None) -> dict:
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "mardini.train", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line.lower()]
    return {"exit_status": done.returncode, "error_lines": errors[-3:], "tail": (done.stdout + done.stderr)[-2000:]}


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides after the defaults (model=small, 12 steps, ...)")
    p.add_argument("--out", required=True)
    p.add_argument("--fail-at", type=int, default=8, help="the training step (1-based) that runs out of memory")
    p.add_argument("--leave-gib", type=float, default=1.0, help="device memory left free for that step")
    p.add_argument("--batch", type=int, default=32, help="micro-batch of launches 1-2 (launch 3: half)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [*DEFAULTS, *args.overrides]
    straight, failing = out / "runs" / "straight", out / "runs" / "failing"
    result = {"overrides": common, "fail_at": args.fail_at, "batch": args.batch}
    result["straight"] = launch([*common, f"train.batch_size={args.batch}", f"train.output_dir={straight}"])
    result["failing"] = launch([str(args.fail_at), str(args.leave_gib), *common, f"train.batch_size={args.batch}",
                                f"train.output_dir={failing}"], FAILING_RUN)
    result["checkpoints_after_failure"] = sorted(p.name for p in (failing / "checkpoints").glob("step_*"))
    result["resumed"] = launch([*common, f"train.batch_size={args.batch // 2}", "train.grad_accum=2",
                                "train.resume=auto", f"train.output_dir={failing}"])
    a, b = losses(straight), losses(failing)
    result["losses"] = {step: [a.get(step), b.get(step)] for step in sorted(a)}
    resumed = [s for s in sorted(a) if s >= args.fail_at and s in b]
    result["max_abs_loss_difference_resumed"] = max((abs(a[s] - b[s]) for s in resumed), default=None)
    (out / "out_of_memory_resume.json").write_text(json.dumps(result, indent=1))
    for name in ("straight", "failing", "resumed"):
        print(name, result[name]["exit_status"], *result[name]["error_lines"], sep="\n  ")
    print("checkpoints after the failure:", result["checkpoints_after_failure"])
    print("max |loss difference| over the resumed steps:", result["max_abs_loss_difference_resumed"])


if __name__ == "__main__":
    main()
