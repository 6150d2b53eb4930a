"""Prototype: a sampling temperature, the sampler's initial noise scaled by tau, scored by the learning benchmark.

Why: the trained models' samples trail their own posterior mean by 0.6-0.8 dB of interpolation PSNR (BENCHMARKS.md,
"Learning"), as a sample of an uncertain motion must when it is scored against one truth. Starting the ODE from
tau * noise (tau < 1) moves a sample towards the mode, as temperature does in MAR's diffusion head: how much PSNR
does that buy, and what does it cost image-to-video's motion (the motion ratio of generated to real clips)? tau = 1 is
the shipped sampler; tau = 0 a deterministic sample from zero noise.

    python benchmarks/prototypes/sampling_temperature.py EXPORT --taus 1 0.8 0.6 0.4 0 --json temperature.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from demo_quality import load_clips  # noqa: E402

from mardini.evaluation.learning import baseline, clip_psnr, i2v_report, samples  # noqa: E402
from mardini.inference import MarDiniPipeline  # noqa: E402
from mardini.masking import task_mask  # noqa: E402


def scaled_noise_sampler(pipe: MarDiniPipeline, tau: float) -> None:
    """Make the pipeline's model start every sample from tau times the noise it is given."""
    generate = type(pipe.model).generate.__get__(pipe.model)
    pipe.model.generate = lambda *a, noise=None, **k: generate(*a, noise=None if noise is None else noise * tau, **k)


def score(pipe: MarDiniPipeline, videos: torch.Tensor, i2v_seeds: int, num_steps: int | None = None) -> dict:
    """Interpolation PSNR of one sample per clip; image-to-video best-of-K, mean PSNR and motion ratio (the learning
    benchmark's i2v_report, same seeds)."""
    interp = task_mask("interpolation", videos.shape[1])
    i2v = i2v_report(pipe, videos, i2v_seeds, num_steps)
    return {"interpolation_psnr": clip_psnr(samples(pipe, videos, interp, num_steps), videos, interp).mean().item(),
            "i2v_best_psnr": i2v["best_psnr"], "i2v_mean_psnr": i2v["mean_psnr"], "motion_ratio": i2v["motion_ratio"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export")
    p.add_argument("--taus", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4, 0.0])
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--i2v-seeds", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    pipe = MarDiniPipeline.from_pretrained(args.export, device=args.device)
    videos, where = load_clips(pipe, None, args.clips)
    interp = task_mask("interpolation", videos.shape[1])
    i2v = task_mask("i2v", videos.shape[1], position="middle")
    report = {"export": args.export, "clips_from": where, "clips": len(videos), "device": args.device,
              "blend_psnr": clip_psnr(baseline(videos, interp, "linear_blend"), videos, interp).mean().item(),
              "repeat_psnr": clip_psnr(baseline(videos, i2v, "repeat_nearest"), videos, i2v).mean().item(),
              "taus": {}}
    print(f"blend {report['blend_psnr']:.2f} dB, repeat frame {report['repeat_psnr']:.2f} dB ({where})")
    for tau in args.taus:
        scaled_noise_sampler(pipe, tau)
        row = report["taus"][str(tau)] = score(pipe, videos, args.i2v_seeds)
        print(f"tau {tau:4.2f}: interpolation {row['interpolation_psnr']:.2f} dB; i2v best of {args.i2v_seeds} "
              f"{row['i2v_best_psnr']:.2f}, mean {row['i2v_mean_psnr']:.2f}, motion ratio {row['motion_ratio']:.2f}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
