"""Speed of the motion estimate in a training step, eager vs torch.compile (train.compile_motion), and whether the
compiled one computes the same: the estimate at the `small` presets' shapes (batch 32 x 17 frames of 12 x 32 x 32
latents, 7 x 7 windows, 3 levels), with learned features forward and backward (model.motion.estimate=learned, the
motion loss's gradient) or without gradient (bilateral); on a GPU under bf16 autocast, as in training.

    python benchmarks/motion_speed.py --device cuda --json motion_speed.json

Reports milliseconds per call (median of --iters after --warmup: CUDA events on a GPU), the compile time of the first call,
and the largest difference of the compiled estimate and features' gradient from the eager ones.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mardini.masking import task_mask
from mardini.models import MarDini, model_config

from common import timed  # benchmarks/common.py (the script's folder is on sys.path)


def step(model: MarDini, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The estimate, and with learned features the gradient of the motion loss on the first feature layer."""
    if model.match_features is None:
        return model.motion(z, mask), None
    model.match_features.zero_grad(set_to_none=True)
    motion = model.motion(z, mask)
    model.motion_loss(motion, z, mask).backward()
    return motion.detach(), model.match_features.net[0].weight.grad.clone()


def measure(model, z, mask, device, warmup, iters) -> tuple[dict, tuple]:
    """The first call's seconds (compilation for a compiled model), then the median of iters calls after warmup."""
    start = time.perf_counter()
    out = step(model, z, mask)
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    seconds, _ = timed(lambda: step(model, z, mask), warmup, iters, device)
    return {"first_call_s": first, "ms": 1e3 * seconds}, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--estimates", nargs="+", default=["learned", "bilateral"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=32, help="latent height = width")
    p.add_argument("--channels", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: trace only, for tests)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    results = []
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, args.frames, args.channels, args.size, args.size, generator=g).to(args.device)
    mask = task_mask("interpolation", args.frames)[None].expand(args.batch, -1).to(args.device)
    for estimate in args.estimates:
        motion = dict(estimate=estimate, temperature=0.3, window=7, residual=True)
        torch.manual_seed(0)
        eager = MarDini(model_config("small", latent_channels=args.channels, motion=motion)).to(args.device)
        compiled = MarDini(model_config("small", latent_channels=args.channels, motion=motion)).to(args.device)
        compiled.load_state_dict(eager.state_dict())
        compiled.compile_motion(backend=args.backend)
        row = {"estimate": estimate, "shape": list(z.shape), "device": args.device, "backend": args.backend}
        with torch.autocast(args.device, torch.bfloat16, enabled=args.device == "cuda"):  # as in training
            row["eager"], (want, want_grad) = measure(eager, z, mask, args.device, args.warmup, args.iters)
            row["compiled"], (got, got_grad) = measure(compiled, z, mask, args.device, args.warmup, args.iters)
        row["speedup"] = row["eager"]["ms"] / row["compiled"]["ms"]
        row["max_abs_diff_estimate"] = (got - want).abs().max().item()
        if want_grad is not None:
            row["grad_rel_diff"] = ((got_grad - want_grad).norm() / want_grad.norm()).item()
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
