r"""Train many variants of one job at once and score each with the learning benchmark.

    python benchmarks/learning_sweep.py --variant base= --variant interp=curriculum=interpolation \
        --seeds 0 1 --parallel 8 --out sweep.jsonl [-- common overrides ...]

Each variant is `name=override override ...` (overrides as on the `mardini-train` command line, space-separated);
every variant runs once per seed as `python -m mardini.train run_name=sweep_<name>_s<seed> seed=<seed> <common>
<overrides>` in its own folder under --runs, then `benchmarks/demo_quality.py` scores its export. Runs go
`--parallel` at a time (on one GPU they share it; on CPU give each a thread count with --threads). One JSON line
per run: variant, seed, overrides, wall seconds, exit status and the benchmark's figures; then a table of the means
per variant.

This is how the learning-rate, objective and model-shape comparisons in BENCHMARKS.md ("Learning") were made: the
same code path as the default job, many runs side by side, each judged on held-out clips against the blend.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name=a=1 b=2' -> ('name', ['a=1', 'b=2'])."""
    name, sep, rest = text.partition("=")
    if not sep or not name or "/" in name:
        raise SystemExit(f"--variant {text!r}: write NAME=OVERRIDES (e.g. lr5e3=train.lr=5e-3, or base= for none)")
    return name, shlex.split(rest)


def run_one(name: str, overrides: list[str], seed: int, args, common: list[str]) -> dict:
    run_name = f"sweep_{name}_s{seed}"
    log = Path(args.logs) / f"{run_name}.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    run_dir = Path(args.runs).resolve() / run_name
    train = [sys.executable, "-m", "mardini.train", f"run_name={run_name}", f"seed={seed}", "train.trackers=[]",
             "train.progress=false", f"train.output_dir={run_dir}", *common, *overrides]
    start = time.time()
    with open(log, "w") as f:
        f.write(" ".join(shlex.quote(a) for a in train) + "\n")
        f.flush()
        status = subprocess.run(train, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    row = {"variant": name, "seed": seed, "overrides": overrides, "common": common, "exit": status,
           "train_s": round(time.time() - start, 1)}
    export = run_dir / "export"
    if status == 0 and export.is_dir():
        report = Path(args.logs) / f"{run_name}.json"
        bench = [sys.executable, str(ROOT / "benchmarks" / "demo_quality.py"), str(export), "--json", str(report),
                 "--clips", str(args.clips), "--i2v-seeds", str(args.i2v_seeds)]
        if args.device:
            bench += ["--device", args.device]
        with open(log, "a") as f:
            subprocess.run(bench, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if report.exists():
            row["report"] = json.loads(report.read_text())
    return row


def summary(rows: list[dict]) -> str:
    """Means per variant: interpolation sampled / posterior mean / blend / the model's motion input alone (nan
    without one), i2v best-of / repeat, motion ratio."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if "report" in r:
            by.setdefault(r["variant"], []).append(r["report"])
    lines = [f"{'variant':24s} runs  sampled  post.mean  blend  motion-in   i2v   repeat  motion"]
    for name, reports in by.items():
        def mean(get):
            vals = [get(x) for x in reports]
            vals = [v for v in vals if v is not None]
            return sum(vals) / len(vals) if vals else float("nan")
        i = lambda k: mean(lambda x: x["interpolation"].get(k))  # noqa: E731
        v = lambda k: mean(lambda x: x.get("i2v", {}).get(k))  # noqa: E731
        lines.append(f"{name:24s} {len(reports):4d}  {i('psnr'):7.2f}  {i('posterior_mean_psnr'):9.2f}  "
                     f"{i('blend_psnr'):5.2f}  {i('motion_input_psnr'):9.2f}  {v('best_psnr'):5.2f}  "
                     f"{v('repeat_psnr'):6.2f}  {v('motion_ratio'):6.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="NAME=OVERRIDES (repeat)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=0, help="OMP/MKL threads per run (0: leave as is)")
    p.add_argument("--device", default=None, help="benchmark device (default: demo_quality's choice)")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--i2v-seeds", type=int, default=4)
    p.add_argument("--out", default="learning_sweep.jsonl")
    p.add_argument("--runs", default="outputs/sweep", help="parent folder of the run folders (one per variant and seed)")
    p.add_argument("--logs", default=None, help="folder for per-run logs and reports (default: next to --out)")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must be unique, got {names}")
    args.logs = args.logs or str(Path(args.out).with_suffix("")) + "_logs"
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    jobs = [(n, o, s) for s in args.seeds for n, o in variants]
    rows = []
    with ThreadPoolExecutor(args.parallel) as pool, open(args.out, "a") as out:
        futures = [pool.submit(run_one, *job, args, common) for job in jobs]
        for future in as_completed(futures):  # in finishing order, so a slow run holds back no other row
            row = future.result()
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{row['variant']} seed {row['seed']}: exit {row['exit']}, {row['train_s']} s", flush=True)
    print(summary(rows))


if __name__ == "__main__":
    main()
