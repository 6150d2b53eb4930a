"""Prototype: FlashAttention-4 against SDPA's cuDNN kernel at this project's attention shapes (issue 16, items 3-4).

The `flash-attn-4` package (module `flash_attn.cute`, kernels written in NVIDIA's CuTe DSL and compiled at first use)
ships Hopper (SM90) forward and backward kernels beside its Blackwell ones; torch >= 2.10 can also route SDPA's
FlashAttention backend to it (`torch.nn.attention.activate_flash_attention_impl("FA4")`), which keeps compiled graphs
whole. This times, per shape, cuDNN (what `auto` runs on Hopper), SDPA's own FlashAttention-2, FA4 called directly
and FA4 behind SDPA, forward (the sampler) or forward + backward (training), and the outputs' error against an fp32
softmax on a subset of the queries; with `--fp8`, FA4's FP8 forward (per-tensor scales) too, to put a figure on the
error that FP8 attention costs. Inputs are laid out as the model's projections write them ([B, N, H, D] memory,
handed to SDPA as [B, H, N, D] views).

    python benchmarks/prototypes/fa4_attention.py --json fa4.json         # on a Hopper GPU with flash-attn-4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import mean_ms  # noqa: E402

# name, batch, heads, queries, keys, head dim, with backward
SHAPES = [
    ("sampler step, image-to-video (11 of 12 frames)", 1, 8, 11 * 1024, 12 * 1024, 128, False),
    ("sampler step, interpolation (10 of 12 frames)", 1, 8, 10 * 1024, 12 * 1024, 128, False),
    ("planner, paper training (17 frames x 256, batch 2)", 2, 16, 17 * 256, 17 * 256, 128, True),
    ("generator, paper training (16 of 17 frames x 1 024, batch 2)", 2, 8, 16 * 1024, 17 * 1024, 128, True),
]


def tensors(B, H, Nq, Nk, D, device, grad):
    g = torch.Generator(device).manual_seed(0)
    make = lambda n: torch.randn(B, n, H, D, device=device, dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = make(Nq), make(Nk), make(Nk)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def reference_rows(q, k, v, rows: int = 1024) -> torch.Tensor:
    """fp32 softmax attention of the first `rows` queries: [B, rows, H, D]."""
    qf, kf, vf = (t.detach().float().transpose(1, 2) for t in (q[:, :rows], k, v))
    w = torch.softmax(qf @ kf.transpose(-1, -2) / qf.shape[-1] ** 0.5, -1)
    return (w @ vf).transpose(1, 2)


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--fp8", action="store_true", help="also FA4's FP8 forward (per-tensor scales)")
    p.add_argument("--json", default="fa4_attention.json")
    args = p.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": []}
    try:
        import flash_attn.cute as fa4
        result["fa4"] = getattr(fa4, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - reported, the rest still runs
        fa4, result["fa4_error"] = None, repr(e)[:2000]
    registry = getattr(torch.nn.attention, "activate_flash_attention_impl", None)
    result["torch_has_fa4_registry"] = registry is not None

    def sdpa(kernel):
        def run(q, k, v):
            with sdpa_kernel([kernel]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        return run

    def fa4_direct(q, k, v):
        out = fa4.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out

    variants = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash2 (SDPA)": sdpa(SDPBackend.FLASH_ATTENTION)}
    if fa4 is not None:
        variants["fa4 direct"] = fa4_direct

    def measure(name, fn, shape):
        label, B, H, Nq, Nk, D, backward = shape
        fwd_flop = 4 * B * H * Nq * Nk * D
        q, k, v = tensors(B, H, Nq, Nk, D, device, backward)
        row = {"shape": label, "variant": name}
        try:
            t0 = time.perf_counter()
            out = fn(q, k, v)
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row["rel_l2_vs_fp32"] = rel_l2(out.detach()[:, :1024], reference_rows(q, k, v))
            if backward:
                grad = torch.randn(out.shape, generator=torch.Generator(device).manual_seed(1), device=device,
                                   dtype=out.dtype)
                out.backward(grad)
                row["grads"] = [t.grad.detach().clone() for t in (q, k, v)]
                for t in (q, k, v):
                    t.grad = None
                step = lambda: fn(q, k, v).backward(grad)  # noqa: E731
                row["ms"] = mean_ms(step, 3, args.iters)
                row["tflops"] = 3.5 * fwd_flop / row["ms"] / 1e9
            else:
                with torch.inference_mode():
                    row["ms"] = mean_ms(lambda: fn(q, k, v), 3, args.iters)
                row["tflops"] = fwd_flop / row["ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:1500]
        print(json.dumps({k: v for k, v in row.items() if k != "grads"}), flush=True)
        return row

    for shape in SHAPES:
        rows = [measure(name, fn, shape) for name, fn in variants.items()]
        base = next((r for r in rows if r["variant"] == "cudnn" and "grads" in r), None)
        for r in rows:
            if base is not None and "grads" in r and r is not base:
                r["grad_rel_l2_vs_cudnn"] = [rel_l2(a, b) for a, b in zip(r["grads"], base["grads"])]
        for r in rows:
            r.pop("grads", None)
        result["rows"] += rows
        Path(args.json).write_text(json.dumps(result, indent=1))

    if fa4 is not None and args.fp8:
        label, B, H, Nq, Nk, D, _ = SHAPES[0]
        q, k, v = tensors(B, H, Nq, Nk, D, device, False)
        row = {"shape": label, "variant": "fa4 fp8 (per-tensor scales)"}
        try:
            amax = [t.abs().amax().float() for t in (q, k, v)]
            scale = [a / 448.0 for a in amax]
            q8, k8, v8 = ((t.float() / s).to(torch.float8_e4m3fn) for t, s in zip((q, k, v), scale))
            scales = fa4.TensorwiseScales(*(s.expand(B, H).contiguous() for s in scale))
            run = lambda: fa4.flash_attn_func(q8, k8, v8, scales=scales)  # noqa: E731
            out = run()
            out = out[0] if isinstance(out, tuple) else out
            row["rel_l2_vs_fp32"] = rel_l2(out[:, :1024], reference_rows(q, k, v))
            row["ms"] = mean_ms(run, 3, args.iters)
            row["tflops"] = 4 * B * H * Nq * Nk * D / row["ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:1500]
        print(json.dumps(row), flush=True)
        result["rows"].append(row)

    if fa4 is not None and registry is not None:
        try:
            registry("FA4")
            result["sdpa_flash_is_fa4"] = True
            for shape in SHAPES:
                result["rows"].append(measure("fa4 behind SDPA (flash backend)", sdpa(SDPBackend.FLASH_ATTENTION),
                                              shape))
                result["rows"][-1].pop("grads", None)
        except Exception as e:  # noqa: BLE001
            result["registry_error"] = repr(e)[:1500]
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
