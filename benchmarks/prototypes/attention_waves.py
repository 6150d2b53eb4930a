"""Prototype: is the sampler's self-attention kernel losing time to wave quantization, and would splitting the keys
win it back? (issue 16 item 4)

The cached sampler step of the paper generator runs one cuDNN attention per block with 11 generated frames of 1 024
queries (image-to-video at 12 frames) against 12 288 keys, 8 heads of 128: at 128 queries per thread block that is
8 x 88 = 704 blocks, 5.3 waves on an H200's 132 SMs, so the last wave runs a third full. This times the kernel at
several query counts (a kernel that loses to quantization runs 11 264 queries no faster per query than 12 672, which
fill 6 waves), and the same attention computed in one call over the keys in S parts folded into the batch (S x as
many blocks) whose partial outputs are merged by their log-sum-exps — exact up to rounding, as split-KV ("flash
decoding") kernels do.

    python benchmarks/prototypes/attention_waves.py --json waves.json            # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import mean_ms  # noqa: E402


def merge_partials(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Softmax attention over the union of key sets from the attention over each set: outputs [B, H, Nq, D] with
    their log-sum-exps [B, H, Nq] (natural log, scaled logits) -> [B, H, Nq, D] in the outputs' dtype."""
    acc = torch.promote_types(outputs[0].dtype, torch.float32)                    # fp32 for bf16, fp64 stays
    lse = torch.stack([x.to(acc) for x in lses])                                  # [S, B, H, Nq]
    weights = torch.softmax(lse, dim=0)                                           # each part's share of the mass
    merged = sum(w[..., None] * o.to(acc) for w, o in zip(weights, outputs))
    return merged.to(outputs[0].dtype)


def attention_with_lse(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp [B, H, Nq]) from cuDNN on a GPU; the same from the explicit softmax elsewhere."""
    if q.is_cuda:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)
        return out[0], out[1].reshape(q.shape[:3])
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (torch.softmax(logits, -1) @ v.to(acc)).to(q.dtype), torch.logsumexp(logits, -1)


def split_key_attention(q, k, v, parts: int) -> torch.Tensor:
    """Attention of q [1, H, Nq, D] over all keys [1, H, Nk, D], computed in ONE call over `parts` contiguous key
    chunks folded into the batch (so the kernel runs parts x as many thread blocks at once) and merged."""
    if q.shape[0] != 1 or k.shape[2] % parts:
        raise ValueError("one clip, and a key count divisible by parts")
    H, Nk, D = k.shape[1:]
    chunks = lambda x: x.reshape(H, parts, Nk // parts, D).transpose(0, 1)  # noqa: E731  [parts, H, Nk/parts, D]
    out, lse = attention_with_lse(q.expand(parts, -1, -1, -1).contiguous(), chunks(k), chunks(v))
    return merge_partials(list(out.unbind(0)), list(lse.unbind(0)))[None]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", default="10240,11264,12288,12672", help="query counts (generated frames x 1024)")
    ap.add_argument("--keys", type=int, default=12288)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--parts", default="1,2,3", help="key chunks (1: one call)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_waves.py times cuDNN attention: it needs a GPU")
    torch.manual_seed(0)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    H, D, Nk = args.heads, args.head_dim, args.keys
    k = torch.randn(1, H, Nk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for Nq in (int(x) for x in args.queries.split(",")):
        q = torch.randn(1, H, Nq, D, device="cuda", dtype=torch.bfloat16)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            reference = F.scaled_dot_product_attention(q, k, v)
            flops = 4.0 * H * Nq * Nk * D
            for parts in (int(x) for x in args.parts.split(",")):
                if parts == 1:
                    fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                else:
                    fn = lambda parts=parts: split_key_attention(q, k, v, parts)  # noqa: E731
                out = fn()
                err = float((out.float() - reference.float()).norm() / reference.float().norm())
                ms = mean_ms(fn, args.warmup, args.iters)
                rows.append({"queries": Nq, "keys": Nk, "parts": parts, "ms": ms, "tflops": flops / ms / 1e9,
                             "us_per_1k_queries": 1000 * ms / (Nq / 1024), "rel_l2_vs_one_call": err})
                print(f"queries {Nq:6d}  parts {parts}  {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  "
                      f"rel L2 {err:.1e}", flush=True)
            # the output's layout when q is a [B, N, H, D] tensor seen as [B, H, N, D] (no transposes needed after)
            q_bnhd = q.transpose(1, 2).contiguous().transpose(1, 2)
            out = F.scaled_dot_product_attention(q_bnhd, k, v)
            ms = mean_ms(lambda: F.scaled_dot_product_attention(q_bnhd, k, v), args.warmup, args.iters)
            rows.append({"queries": Nq, "keys": Nk, "parts": 1, "q_layout": "BNHD", "ms": ms,
                         "tflops": flops / ms / 1e9, "out_stride": list(out.stride())})
            print(f"queries {Nq:6d}  q as [B, N, H, D]  {ms:7.3f} ms  out strides {tuple(out.stride())}", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": H, "head_dim": D,
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
