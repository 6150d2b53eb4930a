"""Prototype: where the SwiGLU input projection's bias goes, and what it costs.

A traced sampler step (benchmarks/profile_step.py --trace) shows one bf16 copy kernel per block inside
`aten::addmm` of the MLP's input projection (`fc_in`, [tokens, 1024] x [1024, 5472]): the bias is written into the
output first and the GEMM then adds into it (cuBLAS "badd" kernels), 1.25 ms of a 24.6 ms step; the other linears
put their bias in the GEMM's epilogue (cuBLASLt "bias" kernels). This script tells why and times the ways out:

- `linear`: F.linear(x, W, b), eager and compiled, for several output widths N (the SwiGLU widths 5472 / 10928 of
  the paper generator / planner, the same rounded up to a multiple of 128, and 3072): does the copy depend on N?
- MLP variants, compiled, forward under inference_mode and forward + backward: `addmm` (the model today), `gate_bias`
  (the GEMM without bias, the bias added in the fused SiLU-and-gate kernel), `hidden128` (the hidden width rounded to
  a multiple of 64, so that fc_in's N is a multiple of 128). Outputs compared with `addmm`'s (bf16 rounding).

Each row: median ms, the kernels that ran (names shortened) and whether a copy kernel did. Writes JSON rows as it
goes.

    python benchmarks/prototypes/mlp_bias.py --json mlp_bias.json
    python benchmarks/prototypes/mlp_bias.py --device cpu --tokens 64 --dims 32   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import timed  # noqa: E402
from mardini.models.layers import MLP, mlp_hidden  # noqa: E402


class GateBiasMLP(MLP):
    """SwiGLU whose input projection runs without its bias; the bias joins the gate's elementwise work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = (F.linear(x, self.fc_in.weight) + self.fc_in.bias).chunk(2, dim=-1)
        return self.fc_out(F.silu(gate) * value)


def kernels_of(fn, device) -> list[str]:
    """Names of the GPU kernels one call runs, or [] on the CPU. A copy kernel's name is kept up to its functor
    (`direct_copy_kernel_cuda`); other names are cut at 70 characters."""
    if device.type != "cuda":
        return []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(k[:k.index("direct_copy") + 23] if "direct_copy" in k else k[:70] for k in names)


def has_copy(kernels: list[str]) -> bool:
    return any("direct_copy" in k for k in kernels)


def row(out, **fields):
    r = {**fields, "copy_kernel": has_copy(fields.get("kernels", []))}
    print(json.dumps(r), flush=True)
    out.append(r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=11264, help="rows of x (a sampler step: 11 frames x 1024 tokens)")
    p.add_argument("--dims", default="1024,2048", help="model widths: the paper generator's and planner's")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup, iters = (3, 20) if device.type == "cuda" else (1, 2)
    rows: list[dict] = []

    def save():
        if args.json:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "args": vars(args), "rows": rows}, open(args.json, "w"), indent=1)

    torch.manual_seed(0)
    for dim in map(int, args.dims.split(",")):
        x = torch.randn(args.tokens, dim, device=device, dtype=dtype)
        swiglu = 2 * mlp_hidden(dim, 4.0, "swiglu")
        for n in sorted({swiglu, (swiglu + 127) // 128 * 128, 3 * dim}):
            lin = nn.Linear(dim, n).to(device, dtype)
            for compiled in (False, True):
                f = torch.compile(lin, dynamic=False) if compiled else lin
                with torch.inference_mode():
                    seconds, _ = timed(lambda: f(x), warmup, iters, device)
                    names = kernels_of(lambda: f(x), device)
                row(rows, part="linear", dim=dim, n=n, compiled=compiled, ms=seconds * 1e3,
                    tflops=2 * args.tokens * dim * n / seconds / 1e12, kernels=names)
                save()
        for name in ("addmm", "gate_bias", "hidden128"):
            torch.manual_seed(1)
            if name == "hidden128":
                mlp = MLP(dim)
                hidden = (mlp.hidden + 63) // 64 * 64
                mlp.hidden, mlp.fc_in, mlp.fc_out = hidden, nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)
            else:
                mlp = (GateBiasMLP if name == "gate_bias" else MLP)(dim)
            mlp = mlp.to(device, dtype)
            if name == "addmm":
                reference = mlp
            elif name == "gate_bias":
                mlp.load_state_dict(reference.state_dict())
            f = torch.compile(mlp, dynamic=False)
            with torch.inference_mode():
                seconds, _ = timed(lambda: f(x), warmup, iters, device)
                names = kernels_of(lambda: f(x), device)
                y = f(x).float()
                if name == "addmm":
                    y_ref = y
            diff = None if name == "hidden128" else ((y - y_ref).norm() / y_ref.norm()).item()
            xg = x.clone().requires_grad_(True)

            def train_step():
                f(xg).sum().backward()

            train_s, _ = timed(train_step, warmup, iters, device)
            train_names = kernels_of(train_step, device)
            row(rows, part="mlp", variant=name, dim=dim, hidden=mlp.hidden, inference_ms=seconds * 1e3,
                train_ms=train_s * 1e3, rel_l2_vs_addmm=diff, kernels=names, train_kernels=train_names,
                train_copy_kernel=has_copy(train_names))
            save()


if __name__ == "__main__":
    main()
