"""FlashAttention-4 as a PyTorch operator: the attention backend `model.attn_backend=fa4`.

The `flash-attn-4` package (module `flash_attn.cute`; extra `mardini[fa4]`) holds attention kernels written in
NVIDIA's CuTe DSL and compiled at their first call, for Hopper (compute capability 9.x) and Blackwell (10.x). On an
H200 at this project's shapes they ran 7-11 % faster than SDPA's cuDNN kernel, forward and backward, with the same
error against an fp32 softmax (BENCHMARKS.md, "FlashAttention-4"). Its Python entry points are opaque to
torch.compile, so each attention call would break a compiled graph in two; wrapped here as custom operators with a
registered backward and shape-only fake kernels, a compiled network stays one graph and the kernels run as extern
calls. The package is a pre-release whose internal entry points (`_flash_attn_fwd`, `_flash_attn_bwd`) change
between versions: the extra pins the version measured.
"""

from __future__ import annotations

import importlib.util

import torch

FA4_VERSION = "4.0.0b40"  # the version the extra pins and BENCHMARKS.md measured

# In generation (no autograd), calls below this many forward FLOPs (4 B H Nq Nk d) run on SDPA instead. Why: the
# package launches each kernel from Python (argument checks, its compile cache, DLPack), which costs more host time
# than SDPA's cuDNN kernel takes for a small call on the GPU. Measured (one H100, 12 frames at 512 px, 25 steps,
# image-to-video, FP8 GEMMs, compiled): 0.620 s with fa4 for every call, 0.606-0.608 s with the small ones on SDPA
# (BENCHMARKS.md, "Inference, thirteenth step"). 1e11 lies between the sampler's self-attention (5.7e11) and its small
# calls (the reference frames' own-frame attention, the per-frame cross-attention to the plan: <= 1.2e10). Training
# keeps fa4 for every call, as measured (6-9 % faster steps): its frame counts are symbolic in the compiled graph,
# where a rule on sizes would add a guard and a recompilation each time a batch crossed the line.
FA4_MIN_FLOP = 1e11


def fa4_installed() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    return importlib.util.find_spec("flash_attn.cute") is not None


FA4_INSTALLED = fa4_installed()


def fa4_runs_on(device: torch.device) -> bool:
    """flash-attn-4 installed and the device a Hopper or Blackwell GPU (the kernels it ships)."""
    device = torch.device(device)
    return FA4_INSTALLED and device.type == "cuda" and torch.cuda.get_device_properties(device).major in (9, 10)


def _interface():
    import flash_attn.cute.interface as interface

    return interface


def fa4_cannot_run(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why FlashAttention-4 cannot run attention (of `dtype`, if given) on `device` here, or None when it can."""
    if not FA4_INSTALLED:
        return f"flash-attn-4 is not installed (pip install 'mardini[fa4]', flash-attn-4=={FA4_VERSION})"
    if not fa4_runs_on(device):
        return f"it runs on NVIDIA GPUs of compute capability 9.x or 10.x (Hopper, Blackwell), not on {device}"
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return f"it runs bf16 or fp16, not {dtype} (train with bf16 autocast, generate in bf16)"
    return None


def check_fa4_inputs(q: torch.Tensor) -> None:
    """A one-line error for what FlashAttention-4 cannot run, instead of the DSL's assertion deep inside."""
    reason = fa4_cannot_run(q.device, q.dtype)
    if reason is not None:
        raise RuntimeError(f"attention backend 'fa4': {reason}; or use model.attn_backend=sdpa")


@torch.library.custom_op("mardini::fa4_forward", mutates_args=(), device_types="cuda")
def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Nq, H, D], k/v [B, Nk, H, D] (token-major) -> (output [B, Nq, H, D] contiguous, log-sum-exp [B, H, Nq]
    fp32)."""
    out, lse = _interface()._flash_attn_fwd(q, k, v, return_lse=True)[:2]
    return out.contiguous(), lse.contiguous()


@fa4_forward.register_fake
def _(q, k, v):
    B, Nq, H, _ = q.shape
    return q.new_empty(q.shape[:3] + v.shape[3:]), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("mardini::fa4_backward", mutates_args=(), device_types="cuda")
def fa4_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), each contiguous in its input's shape."""
    dq, dk, dv = _interface()._flash_attn_bwd(q, k, v, out, grad_out.contiguous(), lse)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@fa4_backward.register_fake
def _(q, k, v, out, grad_out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_backward(q, k, v, out, grad_out, lse)


fa4_forward.register_autograd(_backward, setup_context=_setup_context)


def fa4_worth_it(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether an attention call of q [B, H, Nq, d], k [B, H, Nk, d] is large enough for fa4 (FA4_MIN_FLOP)."""
    B, H, Nq, d = q.shape
    return 4 * B * H * Nq * k.shape[2] * d >= FA4_MIN_FLOP


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(d), as SDPA: q [B, H, Nq, d], k/v [B, H, Nk, d] -> [B, H, Nq, d]. The
    model's heads-first tensors are views of token-major memory (layers.split_heads), which is what the kernels read,
    so the transposes here cost nothing."""
    if not torch.compiler.is_compiling():  # the eager call before compiling checks the same inputs
        check_fa4_inputs(q)
    out, _ = fa4_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
