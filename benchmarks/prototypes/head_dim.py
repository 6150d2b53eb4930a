"""Prototype: how fast SDPA's training kernels run at one width split into heads of 64, 96 or 128.

    python benchmarks/prototypes/head_dim.py --batch 32 --tokens 4352 --width 384 --head-dims 64,128 --json out.json

Times forward + backward of `scaled_dot_product_attention` (bf16 on a GPU, each of --kernels) on (batch, heads,
tokens, head_dim) with heads = width / head_dim: the same FLOPs per row of the table, so the TFLOP/s column says
which split the kernels favour. Why: at research scale the `small` step is attention-bound at head dim 64
(BENCHMARKS.md), and the paper generator gained 8 points of MFU from heads of 128.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mardini.models.flops import _attention_core

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for common.py
from common import timed  # noqa: E402

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_flops(batch: int, heads: int, queries: int, keys: int, head_dim: int) -> int:
    """Useful forward + backward FLOPs as the project counts them (mardini/models/flops.py): forward x 3, the
    backward's recomputed scores not counted. Equal for every split of one width."""
    return 3 * _attention_core(batch * queries * keys, heads * head_dim)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=4352, help="keys (and queries unless --queries)")
    p.add_argument("--queries", type=int, default=0)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--kernels", default="cudnn,flash")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cuda, or cpu with --kernels math (a smoke test)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    queries = args.queries or args.tokens
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    for head_dim in [int(d) for d in args.head_dims.split(",")]:
        if args.width % head_dim:
            raise SystemExit(f"--width {args.width} is not a multiple of head dim {head_dim}")
        heads = args.width // head_dim
        q = torch.randn(args.batch, heads, queries, head_dim, device=args.device, dtype=dtype, requires_grad=True)
        k = torch.randn(args.batch, heads, args.tokens, head_dim, device=args.device, dtype=dtype, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        grad = torch.randn_like(q)
        flops = attention_flops(args.batch, heads, queries, args.tokens, head_dim)
        for name in args.kernels.split(","):
            def step():
                with sdpa_kernel(KERNELS[name]):
                    out = F.scaled_dot_product_attention(q, k, v)
                torch.autograd.backward(out, grad)
            try:
                seconds, _ = timed(step, warmup=3, iters=args.iters, device=args.device)
            except RuntimeError as error:  # a kernel that does not take this shape
                rows.append({"head_dim": head_dim, "heads": heads, "kernel": name, "error": str(error)[:200]})
                continue
            rows.append({"head_dim": head_dim, "heads": heads, "kernel": name, "ms": seconds * 1e3,
                         "tflop": flops / 1e12, "tflops": flops / seconds / 1e12})
            print(f"head dim {head_dim:4d} x {heads:2d} heads  {name:9s} {seconds * 1e3:8.2f} ms  "
                  f"{flops / seconds / 1e12:6.1f} TFLOP/s", flush=True)
    if args.json:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
