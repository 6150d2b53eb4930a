"""Prototype: the cheapest compiled form of the sampler step's query/key preparation (issue 16 item 4).

In the cached sampler step each generator block normalises (RMS over the head dim) and rotates (3D RoPE on
consecutive channel pairs) the queries and keys of the generated frames, appends the reference frames' cached keys and
values, and calls cuDNN attention. Profiled compiled (commit fc8ffc7 + token-major heads), that preparation runs at a
third of the copy rate: one looped reduction kernel of 87 us per block that writes the rotated keys to a buffer which
a second kernel copies into the concatenation. This times one block's self-attention (projection output in, attention
output out) with the paper generator's shapes in several forms that compute the same values:

- rope ``stack``: apply_rope as it was (the rotated pairs stacked); ``flip``: each pair times cos plus the swapped
  pair times (-sin, sin), one pointwise expression (apply_rope since this measurement);
- norm ``fused``: F.rms_norm (the model's RMSNorm); ``manual``: x * rsqrt(mean(x^2) + eps) * w in fp32, rounded where
  F.rms_norm rounds;
- keys ``cat``: the generated and the reference keys and values concatenated each step (the model); ``buffer``: written
  into a preallocated buffer whose reference part was filled once (the concatenation's copy of the new part goes).

    python benchmarks/prototypes/rope_fusion.py --json rope_fusion.json            # on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import mean_ms  # noqa: E402
from mardini.models.layers import apply_rope, cat_tokens, heads_first, split_heads  # noqa: E402


def rope_stack(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope's values as it computed them before: the rotated pairs' two parts stacked."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def rms_manual(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.rms_norm(x, [d], weight, eps=None)'s values, written out (fp32 inside, rounded to x's dtype once)."""
    xf = x.float()
    eps = torch.finfo(x.dtype).eps
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).type_as(x)


def block_attention(rope: str, norm: str, keys: str):
    """f(qkv [1, N, 3D], cos/sin [N, d/2], wq, wk, ref_k/ref_v [1, H, R, d] or buffers [1, N+R, H, d], heads) ->
    the attention output [1, N, D] of one block's generated tokens."""
    rotate = rope_stack if rope == "stack" else apply_rope
    normed = (lambda x, w: F.rms_norm(x, x.shape[-1:], w)) if norm == "fused" else rms_manual

    def f(qkv, cos, sin, wq, wk, ref_k, ref_v, heads: int):
        q, k, v = split_heads(qkv, 3, heads)                                     # [1, N, H, d]
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)                              # [N, 1, d/2]
        q, k = rotate(normed(q, wq), c, s), rotate(normed(k, wk), c, s)
        if keys == "cat":
            k, v = cat_tokens(heads_first(k), ref_k), cat_tokens(heads_first(v), ref_v)
        else:  # ref_k / ref_v are token-major buffers [1, N + R, H, d] whose last R rows hold the references
            n = q.shape[1]
            ref_k[:, :n].copy_(k)
            ref_v[:, :n].copy_(v)
            k, v = heads_first(ref_k), heads_first(ref_v)
        out = F.scaled_dot_product_attention(heads_first(q), k, v)
        return out.transpose(1, 2).flatten(2)                                    # [1, N, D]
    return f


def kernel_us(fn, iters: int) -> dict[str, float]:
    """Each CUDA kernel's time per call (us), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / iters for e in prof.key_averages() if e.device_time_total > 0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=11 * 1024, help="generated tokens (image-to-video at 12 frames)")
    p.add_argument("--references", type=int, default=1024, help="the reference frames' tokens")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", default="rope_fusion.json")
    args = p.parse_args()

    device, dtype = torch.device("cuda"), torch.bfloat16
    N, R, D, H = args.tokens, args.references, args.dim, args.heads
    d = D // H
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(1, N, 3 * D, device=device, dtype=dtype, generator=g)
    angles = torch.rand(N, d // 2, device=device, generator=g) * 20
    cos, sin = angles.cos(), angles.sin()
    wq, wk = (1 + 0.1 * torch.randn(d, device=device, dtype=dtype, generator=g) for _ in range(2))
    ref = [torch.randn(1, R, H, d, device=device, dtype=dtype, generator=g) for _ in range(2)]  # token-major

    def inputs(keys: str):
        if keys == "cat":
            return [heads_first(r) for r in ref]
        buffers = [torch.empty(1, N + R, H, d, device=device, dtype=dtype) for _ in range(2)]
        for b, r in zip(buffers, ref):
            b[:, N:] = r
        return buffers

    reference = block_attention("stack", "fused", "cat")(qkv, cos, sin, wq, wk, *inputs("cat"), H).float()
    sdpa_only_inputs = [torch.randn(1, H, n, d, device=device, dtype=dtype, generator=g).transpose(1, 2).contiguous()
                        .transpose(1, 2) for n in (N, N + R, N + R)]
    sdpa_ms = mean_ms(lambda: F.scaled_dot_product_attention(*sdpa_only_inputs), 5, args.iters)
    rows = []
    for rope, norm, keys in itertools.product(("stack", "flip"), ("fused", "manual"), ("cat", "buffer")):
        f = torch.compile(block_attention(rope, norm, keys))
        ref_k, ref_v = inputs(keys)
        call = lambda: f(qkv, cos, sin, wq, wk, ref_k, ref_v, H)  # noqa: E731
        out = call().float()
        ms = mean_ms(call, 5, args.iters)
        kernels = kernel_us(call, 10)
        prep = sum(us for name, us in kernels.items() if "triton" in name)
        row = {"rope": rope, "norm": norm, "keys": keys, "ms": ms, "ms_minus_attention": ms - sdpa_ms,
               "triton_us": prep, "max_abs_diff_vs_model": (out - reference).abs().max().item(),
               "kernels_us": {k[:100]: round(v, 1) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:8]}}
        rows.append(row)
        print(f"{rope:5s} {norm:6s} {keys:6s} {ms:.3f} ms (attention alone {sdpa_ms:.3f}), triton {prep:.1f} us, "
              f"max |diff| vs the model's form {row['max_abs_diff_vs_model']:.2e}", flush=True)
    with open(args.json, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                   "sdpa_alone_ms": sdpa_ms, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
