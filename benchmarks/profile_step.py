"""Where a training step's GPU time goes: attention kernels, matmuls, everything else, and idle gaps.

    python benchmarks/profile_step.py --part generator --compile 1
    python benchmarks/profile_step.py --part sample --batch 1 --frames 12   # one sampler step (benchmarks/inference.py)
    python benchmarks/profile_step.py --part sample --batch 1 --frames 12 --ops 40 --trace trace.json  # which op
    python benchmarks/profile_step.py --part sample --batch 1 --frames 12 --kernel fa4 --fp8 mlp+qkv+proj+fast

Runs a few steps of benchmarks/train_step.py's setup under torch.profiler and groups CUDA kernel time by name.
`sample` profiles one denoising step of generation instead: the generator in bf16 under inference_mode on
image-to-video masks, the reference frame cached (MarDini.generate's default), its attention on --kernel (an SDPA
kernel, or the fa4 backend with generation's rule for small calls) and its GEMMs in FP8 where --fp8 says (the
entries of benchmarks/inference.py's --fp8).
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from inference import attention_choice, fp8_choice  # benchmarks/inference.py (the script's folder is on sys.path)
from mardini.models import MarDini, model_config
from mardini.models.fp8 import use_fp8_gemms
from train_step import build_step, make_batch  # benchmarks/train_step.py

GROUPS = [("attention", r"fmha|flash|attention|sdpa|cudnn"), ("matmul", r"gemm|xmma|cutlass|nvjet|wgmma|matmul"),
          ("optimizer", r"adam|foreach|multi_tensor"), ("triton (fused elementwise)", r"triton"),
          ("other", r".")]


def build_sample_step(args, compile_: bool, kernel: str = "cudnn", fp8: str = "none"):
    """One sampler step of generation: the bf16 generator on the generated frames, the reference frames cached;
    kernel: an SDPA kernel or another backend (inference.attention_choice); fp8: an --fp8 entry
    (inference.fp8_choice)."""
    device = torch.device("cuda")
    cfg = model_config(args.size, latent_channels=args.channels, lowres_factor=args.lowres, max_frames=args.frames,
                       **attention_choice(kernel))
    torch.manual_seed(0)
    generator = MarDini(cfg).generator.to(device, torch.bfloat16).eval()
    layers, fast_accum = fp8_choice(fp8)
    if layers:
        use_fp8_gemms(generator, layers, fast_accum)
    z_hi, _, mask = make_batch(args, device)
    z_hi = z_hi.bfloat16()
    plan = torch.randn(*mask.shape, (args.latent // args.lowres) ** 2, cfg.signal_dim, device=device,
                       dtype=torch.bfloat16)
    time_in = torch.where(mask, 500.0, 0.0)
    with torch.inference_mode():
        cache = generator.cache_references(z_hi, mask, plan)
    if compile_:
        generator.compile(dynamic=False)

    @torch.inference_mode()
    def step():
        generator(z_hi, mask, time_in, plan, cache=cache)

    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", default="generator", choices=("planner", "generator", "joint", "sample"))
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--lowres", type=int, default=4)
    p.add_argument("--size", default="paper", help="model size (mardini/models/config.py MODEL_SIZES)")
    p.add_argument("--impl", default="gather", help="identity-attention implementation: gather, split, mask")
    p.add_argument("--kernel", default="cudnn",
                   help="sample: an SDPA kernel, xformers or fa4 (inference.py's --kernel)")
    p.add_argument("--fp8", default="none",
                   help="sample: the generator's GEMMs in FP8 (an entry of inference.py's --fp8)")
    p.add_argument("--top", type=int, default=15, help="how many kernels the JSON lists")
    p.add_argument("--ops", type=int, default=0,
                   help="also list the N operators whose own kernels take the most GPU time, with input shapes")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--trace", default="", help="also write the profiled steps' Chrome trace (chrome://tracing) here")
    args = p.parse_args()
    if args.part == "sample":
        step = build_sample_step(args, bool(args.compile), args.kernel, args.fp8)
    else:
        step, _, _ = build_step(args, args.part, bool(args.compile), kernel="cudnn", impl=args.impl)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU], record_shapes=args.ops > 0) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / steps
    if args.trace:
        prof.export_chrome_trace(args.trace)
    totals = {name: 0.0 for name, _ in GROUPS}
    kernels = {}
    for evt in prof.key_averages():
        # Kernels only: a user annotation on the GPU timeline (e.g. "Optimizer.step#AdamW.step") spans kernels that
        # are listed themselves, and counting both would double their time.
        if evt.device_type != torch.autograd.DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
            continue
        us = evt.self_device_time_total / steps
        kernels[evt.key] = us
        for name, pattern in GROUPS:
            if re.search(pattern, evt.key, re.IGNORECASE):
                totals[name] += us / 1e3
                break
    busy = sum(totals.values())
    report = {"part": args.part, "identity_impl": args.impl, "compile": bool(args.compile), "wall_ms": wall_ms,
              **({"kernel": args.kernel, "fp8": args.fp8} if args.part == "sample" else {}),
              "busy_ms": busy, "idle_ms": wall_ms - busy, "groups_ms": totals,
              "top_kernels_us": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top])}
    if args.ops:
        ops = [(evt.self_device_time_total / steps, evt.key, str(evt.input_shapes))
               for evt in prof.key_averages(group_by_input_shape=True)
               if evt.device_type == torch.autograd.DeviceType.CPU and evt.self_device_time_total > 0]
        report["top_ops_us"] = [{"op": key, "shapes": shapes, "us": us}
                                for us, key, shapes in sorted(ops, reverse=True)[:args.ops]]
    json.dump(report, open(args.out, "w"), indent=1)
    print(f"{args.part} compile={bool(args.compile)}: step {wall_ms:.1f} ms, kernels {busy:.1f} ms, "
          f"idle {wall_ms - busy:.1f} ms")
    for name, ms in totals.items():
        print(f"  {name:28s} {ms:8.1f} ms  {ms / wall_ms:6.1%}")


if __name__ == "__main__":
    main()
