"""Training-step throughput and MFU of the planner, the generator and the joint model at paper-like shapes.

MFU = model FLOPs per second / peak bf16 matmul rate. Model FLOPs come from the model's own analytic count
(mardini/models/flops.py; useful work only: identity attention counts generated-frame queries x all keys plus
reference queries x own frame) times 3 for forward + backward. The peak defaults to 803 TFLOP/s, the bf16 matmul
rate measured on this project's H100 (8192^3 matmul).

    python benchmarks/train_step.py --parts joint --compile 0,1 --kernels cudnn,xformers --out results.json

Each variant: eager/compile x activation checkpointing x attention kernel (an SDPA kernel, xformers or fa4) x
identity-attention implementation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from common import timed  # benchmarks/common.py (the script's folder is on sys.path)
from mardini.diffusion import Diffusion, DiffusionConfig
from mardini.models import MarDini, model_config
from mardini.models.generator import frame_counts
from mardini.models.mardini import lowres_from_hires
from mardini.training.optim import build_optimizer
from mardini.training.parallel import apply_activation_checkpointing, apply_compile


class OptimCfg:
    lr, weight_decay, beta1, beta2, eps = 1e-4, 0.01, 0.9, 0.99, 1e-8


def make_batch(args, device):
    g = torch.Generator(device).manual_seed(0)
    B, T, C, S = args.batch, args.frames, args.channels, args.latent
    z_hi = torch.randn(B, T, C, S, S, device=device, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    if getattr(args, "given", 1) == 2:  # interpolation: first and last frames given
        mask[:, [0, -1]] = False
    else:  # image-to-video with the reference in the middle: the curriculum's final stage
        mask[:, T // 2] = False
    return z_hi, lowres_from_hires(z_hi, args.lowres), mask.to(device)


def build_step(args, part: str, compile_: bool = False, ac: bool = False, kernel: str = "cudnn",
               impl: str = "gather", backend: str = "sdpa", generator_heads: int = 0):
    """(step, model, mask): one bf16 training step of `part` (planner | generator | joint) with fused AdamW on a
    fixed paper-like batch; shared with profile_step.py. generator_heads > 0 overrides the size's head count (same
    width and parameters, other head dim)."""
    device = torch.device("cuda")
    generator = dict(identity_impl=impl, **({"num_heads": generator_heads} if generator_heads else {}))
    cfg = model_config(args.size, latent_channels=args.channels, lowres_factor=args.lowres, max_frames=args.frames,
                       sdpa_kernel=kernel, attn_backend=backend, generator=generator)
    torch.manual_seed(0)
    model = MarDini(cfg).to(device)
    if ac:
        apply_activation_checkpointing(model)
    if compile_:
        apply_compile(model)
    diffusion = Diffusion(DiffusionConfig())
    opt = build_optimizer(model if part == "joint" else getattr(model, part), OptimCfg, fused=True)
    z_hi, z_lo, mask = make_batch(args, device)
    B, T = mask.shape
    t = torch.full((B,), 0.5, device=device)
    noise = torch.randn_like(z_hi)
    time_in = torch.where(mask, 500.0, 0.0)
    plan_shape = (B, T, (args.latent // args.lowres) ** 2, cfg.signal_dim)
    plan_fixed = torch.randn(plan_shape, device=device, dtype=torch.bfloat16)
    counts = frame_counts(mask.cpu())  # read once, here: the trainer reads its masks' counts on the host too

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if part == "joint":
                loss = model(z_hi, z_lo, mask, diffusion, noise=noise, t=t, frame_counts=counts)["loss"]
            elif part == "planner":
                loss = model.planner(z_lo, mask).float().square().mean()
            else:
                loss = model.generator(z_hi, mask, time_in, plan_fixed, frame_counts=counts).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, mask


def run_variant(args, part: str, compile_: bool, ac: bool, kernel: str, impl: str, heads: int = 0) -> dict:
    """kernel: an SDPA kernel (cudnn, flash, efficient, math, auto) or "xformers" / "fa4" (those backends); heads:
    the generator's head count (0 = the size's)."""
    backend = kernel if kernel in ("xformers", "fa4") else "sdpa"
    step, model, mask = build_step(args, part, compile_, ac, "auto" if backend != "sdpa" else kernel, impl,
                                   backend, heads)
    cfg, (B, T) = model.cfg, mask.shape
    seconds, peak = timed(step, args.warmup + (3 if compile_ else 0), args.iters)
    flops = model.estimate_flops(T, (args.latent, args.latent), int(mask[0].sum()), B)
    model_flops = 3 * {"joint": flops["total"], "planner": flops["planner"], "generator": flops["generator"]}[part]
    n_lo, n_hi = (args.latent // args.lowres) ** 2, (args.latent // cfg.generator.patch_size) ** 2
    tokens = B * T * {"joint": n_lo + n_hi, "planner": n_lo, "generator": n_hi}[part]
    params = model.num_parameters()
    return {"part": part, "compile": compile_, "activation_checkpointing": ac, "sdpa_kernel": kernel,
            "identity_impl": impl, "generator_heads": cfg.generator.num_heads,
            "generator_head_dim": cfg.generator.dim // cfg.generator.num_heads, "batch": B, "frames": T,
            "given": T - int(mask[0].sum()),
            "latent": args.latent, "step_s": seconds,
            "tokens_per_s": tokens / seconds, "tflops": model_flops / seconds / 1e12,
            "mfu": model_flops / seconds / (args.peak_tflops * 1e12), "peak_mem_gib": peak,
            "params_m": {k: v / 1e6 for k, v in params.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="paper")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--latent", type=int, default=64, help="latent side (512 px / 8)")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--lowres", type=int, default=4, help="planner latent downsampling r")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--given", type=int, default=1, choices=(1, 2),
                   help="given frames: 1 = image-to-video (the middle one), 2 = interpolation (first and last)")
    p.add_argument("--parts", default="planner,generator,joint")
    p.add_argument("--compile", default="0,1")
    p.add_argument("--ac", default="0")
    p.add_argument("--kernels", default="cudnn,flash", help="SDPA kernels, and/or xformers, fa4 (those backends)")
    p.add_argument("--impls", default="gather", help="identity-attention implementations: gather, split, mask")
    p.add_argument("--generator-heads", default="0", help="generator head counts (0 = the size's), e.g. 16,8")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=803.0)
    p.add_argument("--budget-s", type=float, default=500, help="stop starting new variants after this long")
    p.add_argument("--out", default="train_step.json")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    results, start = [], time.time()
    grid = itertools.product(args.parts.split(","), [bool(int(c)) for c in args.compile.split(",")],
                             [bool(int(a)) for a in args.ac.split(",")], args.kernels.split(","), args.impls.split(","),
                             [int(h) for h in args.generator_heads.split(",")])
    for part, comp, ac, kernel, impl, heads in grid:
        if time.time() - start > args.budget_s:
            print(f"budget reached; skipping {part} compile={comp} ac={ac} {kernel} {impl} heads={heads}")
            continue
        try:
            r = run_variant(args, part, comp, ac, kernel, impl, heads)
        except Exception as e:  # e.g. out of memory, or a kernel that refuses the shape
            r = {"part": part, "compile": comp, "activation_checkpointing": ac, "sdpa_kernel": kernel,
                 "identity_impl": impl, "generator_heads": heads, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r), flush=True)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                       "results": results}, f, indent=1)
    print(f"\n{'part':10s} {'compile':7s} {'ac':3s} {'kernel':8s} {'impl':6s} {'heads':>5s} {'step s':>8s} {'tok/s':>10s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'mem GiB':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['part']:10s} {str(r['compile']):7s} {str(r['activation_checkpointing'])[0]:3s} "
                  f"{r['sdpa_kernel']:8s} {r['identity_impl']:6s} {r['generator_heads']:5d} {r['error'][:60]}")
            continue
        print(f"{r['part']:10s} {str(r['compile']):7s} {str(r['activation_checkpointing'])[0]:3s} "
              f"{r['sdpa_kernel']:8s} {r['identity_impl']:6s} {r['generator_heads']:5d} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} "
              f"{r['tflops']:8.1f} {r['mfu']:6.1%} {r['peak_mem_gib']:8.1f}")


if __name__ == "__main__":
    main()
