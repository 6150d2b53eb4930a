r"""Throughput of the real training loop (`mardini.train`: data loading, masks, EMA, logging included) for a preset
under several variants, e.g. with and without torch.compile.

    python benchmarks/train_throughput.py experiment=small_synthetic --variants "compile=train.compile=false" \
        "compile=train.compile=true" --steps 300 --json out.json

Each variant trains `--steps` steps in a fresh run folder (no evaluation, checkpoints or trackers) and is timed from
the wall-clock `time` of each step in metrics.jsonl, over the second half of the run (after compilation and warm-up).
MFU = model FLOPs per second (mardini/models/flops.py, forward x 3, at the curriculum's mean number of generated
frames) / `--peak-tflops` (790: the bf16 matmul rate measured on the lent H200).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mardini.cli import compose_config
from mardini.masking import MaskSampler
from mardini.models import MarDini, as_model_config


def steady_rate(metrics: list[dict]) -> float:
    """Steps per second over the second half of the run (everything included: recompilations, evaluations)."""
    half = metrics[len(metrics) // 2:]
    return (half[-1]["step"] - half[0]["step"]) / (half[-1]["time"] - half[0]["time"])


def step_seconds(metrics: list[dict]) -> list[float]:
    """Seconds per step between consecutive logged steps of the second half of the run."""
    half = metrics[len(metrics) // 2:]
    return [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(half, half[1:])]


def median_rate(metrics: list[dict]) -> float:
    """Steps per second of the median step of the second half: the compiled steady state, without the
    recompilations that a curriculum's new mask shapes cause (a few per run, 5-17 s each at paper size)."""
    seconds = sorted(step_seconds(metrics))
    return 1.0 / seconds[len(seconds) // 2]


def model_flops_per_step(overrides: list[str]) -> tuple[float, dict]:
    """Training FLOPs of one optimizer step per process (3 x forward, a generator pass per train.noise_draws) at the
    mean number of generated frames of the curriculum's second half (where the rates are measured); identity
    autoencoder only (0 otherwise: a VAE's latent shape needs its weights)."""
    cfg = compose_config(overrides)
    t, data = cfg.train, getattr(cfg.data, cfg.data.source)
    frames, batch = data.num_frames, t.batch_size * t.grad_accum
    sampler = MaskSampler(cfg.curriculum, t.max_steps)
    g = torch.Generator().manual_seed(0)
    steps = [t.max_steps // 2 + i * (t.max_steps - t.max_steps // 2) // 8 for i in range(8)]  # the second half
    masked = sum(int(sampler.sample(s, frames, g).sum()) for s in steps for _ in range(64)) / 512
    shape = {"mean_generated_frames": masked, "frames": frames, "batch_per_process": batch}
    if cfg.autoencoder.name != "identity":
        return 0.0, shape
    with torch.device("meta"):
        model = MarDini(as_model_config(cfg.model))
    latent_hw = (data.height // cfg.autoencoder.patch_size, data.width // cfg.autoencoder.patch_size)
    flops = model.estimate_flops(frames, latent_hw, round(masked), batch, noise_draws=t.noise_draws)
    m = model.cfg
    n_hi = (latent_hw[0] // m.generator.patch_size) * (latent_hw[1] // m.generator.patch_size)
    lo = m.lowres_factor * m.planner.patch_size
    tokens = frames * (n_hi + (latent_hw[0] // lo) * (latent_hw[1] // lo))  # generator + planner tokens
    return 3 * flops["total"], {**shape, "latent_hw": latent_hw, "tokens_per_sample": tokens}


def run_variant(name: str, overrides: list[str], steps: int, workdir: Path, log) -> dict:
    run_dir = workdir / name
    cmd = [sys.executable, "-m", "mardini.train", *overrides, f"train.max_steps={steps}", "train.eval_every=0",
           "train.sample_every=0", f"train.checkpoint_every={10 * steps}", "train.trackers=[]",
           "train.progress=false", "train.num_sample_videos=1", f"train.output_dir={run_dir}"]
    started = time.time()
    done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")] if done.returncode == 0 else []
    result = {"variant": name, "overrides": overrides, "exit_status": done.returncode}
    if metrics:
        result["steps_per_s"] = steady_rate(metrics)
        result["seconds_to_first_step"] = metrics[0]["time"] - started  # start-up and compilation
        result["first_losses"] = [m["loss"] for m in metrics[:5]]  # variants of equal arithmetic start alike
        result["final_loss"] = sum(m["loss"] for m in metrics[-20:]) / len(metrics[-20:])
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides shared by every variant (e.g. experiment=...)")
    p.add_argument("--variants", nargs="+", default=["eager=train.compile=false", "compiled=train.compile=true"],
                   help="NAME=OVERRIDE[,OVERRIDE...] per variant")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--json", default="")
    p.add_argument("--log", default="", help="training output of every variant (default: a temporary file)")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, open(args.log or Path(tmp) / "log.txt", "w") as log:
        for spec in args.variants:
            name, _, extra = spec.partition("=")
            overrides = [*args.overrides, *[o for o in extra.split(",") if o]]
            result = run_variant(name, overrides, args.steps, Path(tmp), log)
            flops, shape = model_flops_per_step(overrides)
            result.update(shape, model_tflop_per_step=flops / 1e12)
            if "steps_per_s" in result:
                result["mfu"] = flops * result["steps_per_s"] / (args.peak_tflops * 1e12) if flops else None
                result["samples_per_s"] = result["steps_per_s"] * shape["batch_per_process"]
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
