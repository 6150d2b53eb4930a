r"""Prototype: would FP8 GEMMs in the generator's sampler steps keep generation within bf16's tolerance?

Issue 16 item 4 asks for 12 frames at 512 px in <= 0.6 s "with the same outputs as today's path to bf16
tolerance"; image-to-video takes 0.630-0.654 s on one H200, and its sampler steps' GEMMs (5.7 ms of a 21.6 ms step)
are the one part left that a cheaper number format could halve. Before timing FP8 on a GPU, this measures its error
where it can be computed exactly, in float32 on the CPU: the paper-size model (the real widths, so every GEMM has the
real inner dimension) over a smaller latent grid, image-to-video (the middle frame given), the same noise, sampled

- in float32 (the reference),
- in bf16 (today's path: the model's weights and activations in bf16),
- in bf16 with the generator's token GEMMs in its sampler steps (the linear layers --layers names) computed as
  FP8 GEMMs (e4m3 inputs,
  per-token scales for the activations and per-output-channel scales for the weights, as torch._scaled_mm's
  rowwise mode takes them; emulated exactly: quantised, dequantised, multiplied in float32, rounded to bf16),
  and, with --planner-layers, the planner's named linear layers in its one pass too (an empty --layers leaves the
  generator in bf16),

and reports each one's relative L2 distance and largest difference from the float32 samples. FP8 is within bf16's
tolerance only if its error is of the order of bf16's own.

    python benchmarks/prototypes/fp8_error.py --latent 16 --frames 12 --steps 25 --json fp8_error.json
    python benchmarks/prototypes/fp8_error.py --latent 16 --frames 12 --steps 25 --layers 'mlp\.fc_in'
    python benchmarks/prototypes/fp8_error.py --latent 16 --frames 12 --steps 25 --layers '' --planner-layers 'mlp\.fc_in'
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_generator import add_clip_arguments, i2v_setup  # noqa: E402
from mardini.models.fp8 import quantise_rows  # noqa: E402


def fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded to e4m3 with one scale per row (amax -> 448), returned dequantised in float32."""
    q, scale = quantise_rows(x)
    return q.float() * scale


class FP8Linears(TorchFunctionMode):
    """Every F.linear whose weight is one of `weights` computed from FP8-rounded inputs (per-token activation scales,
    per-output-channel weight scales), accumulated in float32, returned in the input's dtype."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.weights, self.calls = {id(w) for w in weights}, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if id(weight) in self.weights:
                self.calls += 1
                out = fp8_rows(x) @ fp8_rows(weight).t()
                if bias is not None:
                    out = out + bias.float()
                return out.to(x.dtype)
        return func(*args, **kwargs)


class ForwardInFP8(torch.nn.Module):
    """A module with its forward under FP8Linears: the generator's sampler steps (its one reference pass and every
    other method are the wrapped module's own, bf16), or the planner's one pass."""

    def __init__(self, module: torch.nn.Module, layers: str):
        super().__init__()
        weights = [m.weight for name, m in module.named_modules()
                   if isinstance(m, torch.nn.Linear) and re.search(layers, name)]
        if not weights:
            raise ValueError(f"{layers!r} names no linear layer of the {type(module).__name__.lower()}")
        self.inner, self.mode = module, FP8Linears(weights)

    def forward(self, *args, **kwargs):
        with self.mode:
            return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_clip_arguments(p, latent=16)
    p.add_argument("--layers", default=r"attn\.(qkv|proj)|cross\.(q|proj)|mlp\.fc_(in|out)",
                   help="regex on the generator's module names: the linear layers computed in FP8 (default: every "
                        "GEMM over the generated tokens; the per-frame modulation and the plan's keys stay bf16)")
    p.add_argument("--planner-layers", default="",
                   help="regex on the planner's module names: its linear layers computed in FP8 too (its one pass per "
                        "call), e.g. 'attn\\.(qkv|proj)|mlp\\.fc_(in|out)'; empty: the planner stays bf16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, z, mask, diffusion = i2v_setup(args)

    @torch.inference_mode()
    def sample(dtype: torch.dtype) -> torch.Tensor:
        return model.to(dtype).generate(z.to(dtype), mask, diffusion, num_steps=args.steps,
                                        generator=torch.Generator().manual_seed(0)).float()

    rows, eager_generator, eager_planner = {}, model.generator, model.planner
    for name, dtype, fp8 in (("float32", torch.float32, False), ("bf16", torch.bfloat16, False),
                             ("bf16 + FP8 GEMMs", torch.bfloat16, True)):
        if fp8:
            model.generator = ForwardInFP8(eager_generator, args.layers) if args.layers else eager_generator
            model.planner = (ForwardInFP8(eager_planner, args.planner_layers) if args.planner_layers
                             else eager_planner)
        start = time.perf_counter()
        out = sample(dtype)
        calls = sum(m.mode.calls for m in (model.generator, model.planner) if isinstance(m, ForwardInFP8))
        rows[name] = {"samples": out, "seconds": time.perf_counter() - start, "fp8_linear_calls": calls}
        print(f"{name}: {rows[name]['seconds']:.1f} s", flush=True)
    model.generator, model.planner = eager_generator, eager_planner
    reference, generated = rows["float32"]["samples"], mask[0]
    report = {"what": __doc__.splitlines()[0], "args": vars(args), "torch": torch.__version__, "results": {}}
    for name, row in rows.items():
        diff = (row["samples"] - reference)[:, generated]
        report["results"][name] = {
            "rel_l2_vs_float32": (diff.norm() / reference[:, generated].norm()).item(),
            "max_abs_diff_vs_float32": diff.abs().max().item(), "seconds": row["seconds"],
            "fp8_linear_calls": row["fp8_linear_calls"]}
    bf16 = rows["bf16"]["samples"][:, generated]
    fp8_vs_bf16 = rows["bf16 + FP8 GEMMs"]["samples"][:, generated] - bf16
    report["fp8_vs_bf16_rel_l2"] = (fp8_vs_bf16.norm() / bf16.norm()).item()
    for name, r in report["results"].items():
        print(f"{name:>18s}: rel L2 vs float32 {r['rel_l2_vs_float32']:.2e}, max |diff| "
              f"{r['max_abs_diff_vs_float32']:.3f}  ({r['fp8_linear_calls']} FP8 linear calls)")
    print(f"FP8 against bf16: rel L2 {report['fp8_vs_bf16_rel_l2']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
