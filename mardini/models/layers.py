"""Building blocks shared by the planner and the generator.

Attention takes q, k, v as ``[B, H, N, d]`` and an optional boolean mask (True = may attend) and dispatches to
PyTorch SDPA (with a selectable kernel), xformers or FlashAttention-4 (flash4.py). Positions enter through 3D rotary
embeddings over (t, y, x), so one model handles any number of frames and any latent size without learned position
tables.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import flash4
from .flash4 import fa4_attention, fa4_cannot_run


def preload_cuda12_runtime() -> Path | None:
    """Load CUDA 12's runtime library when torch is built for another CUDA; returns the file loaded, or None.

    The xformers wheel on PyPI is built for CUDA 12 and links ``libcudart.so.12``, which a CUDA-13 build of torch does
    not ship, so its extension fails to load and every xformers attention call finds no kernel. The
    ``nvidia-cuda-runtime-cu12`` wheel (in the ``gpu`` extra) holds that library; loaded first, globally, it satisfies
    the extension's dependency (the driver runs both runtimes; measured on an H200, BENCHMARKS.md "xformers")."""
    if not torch.version.cuda or torch.version.cuda.startswith("12."):
        return None  # CPU build, or torch already brings CUDA 12's runtime
    try:
        import nvidia.cuda_runtime as runtime_package  # the CUDA 12 runtime wheel; CUDA 13's lives in nvidia/cu13
    except ImportError:
        return None
    for folder in runtime_package.__path__:
        library = Path(folder) / "lib" / "libcudart.so.12"
        if library.is_file():
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
            return library
    return None


xops = None  # xformers.ops when the optional `gpu` extra is installed and loads
if importlib.util.find_spec("xformers") is not None:
    try:
        preload_cuda12_runtime()
        import xformers.ops as xops
    except Exception:  # pragma: no cover - depends on the environment; xops stays None
        pass

ATTENTION_BACKENDS = ("sdpa", "xformers", "fa4")
SDPA_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")


def xformers_available() -> bool:
    return xops is not None


def backend_cannot_run(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why an attention backend has no kernels for `device` (and, given, `dtype`) here, or None where it has."""
    device = torch.device(device)
    if backend == "xformers":
        if xops is None:
            return "xformers is not installed or does not load here (pip install 'mardini[gpu]')"
        if device.type != "cuda":
            return f"its attention kernels run on CUDA GPUs, not on {device}"
    elif backend == "fa4":
        return fa4_cannot_run(device, dtype)
    elif backend != "sdpa":
        return f"unknown attention backend; choose one of {ATTENTION_BACKENDS}"
    return None


def check_backend(backend: str, device: torch.device, dtype: torch.dtype, setting: str = "model.attn_backend") -> None:
    """Refuse, before a model is built or a run folder written, an attention backend with no kernels for `device`
    at `dtype` (the dtype attention runs in: the autocast dtype in training), in one line naming `setting`; the
    first forward pass would otherwise fail deep inside, after the start-up."""
    reason = backend_cannot_run(backend, device, dtype)
    if reason is not None:
        raise ValueError(f"{setting}={backend}: {reason}; use {setting}=sdpa")


def sdpa_backends(kernel: str, device: torch.device) -> tuple[list, bool] | None:
    """The SDPA backends a kernel name allows on a device, and whether their order is a priority (None: PyTorch's
    own choice). ``auto`` is PyTorch's order (FlashAttention first) except on Hopper GPUs (compute capability 9.x),
    where it tries cuDNN's attention first: faster there (BENCHMARKS.md, "Attention kernels"), with the other kernels
    kept as fallbacks for inputs cuDNN does not serve."""
    from torch.nn.attention import SDPBackend

    if kernel == "auto":
        if device.type == "cuda" and torch.cuda.get_device_properties(device).major == 9:
            return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH], True
        return None
    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[kernel]
    return [backend], False


def _sdpa_context(kernel: str, device: torch.device):
    """A context that restricts SDPA to one kernel, or orders its kernels (``auto``, see sdpa_backends)."""
    choice = sdpa_backends(kernel, device)
    if choice is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    backends, priority = choice
    return sdpa_kernel(backends, set_priority=priority)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str = "sdpa",
    sdpa_kernel: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention. q: [B, H, Nq, d], k/v: [B, H, Nk, d], mask: bool broadcastable to
    [B, H, Nq, Nk] (True = attend). Returns [B, H, Nq, d]. In generation (no autograd) the fa4 backend runs calls
    too small to pay its launch on SDPA (flash4.FA4_MIN_FLOP)."""
    if backend == "fa4":
        if mask is not None:
            raise ValueError("attention backend 'fa4' takes no mask: use model.generator.identity_impl=gather or split")
        if torch.is_grad_enabled() or flash4.fa4_worth_it(q, k):
            return fa4_attention(q, k, v)
        if not torch.compiler.is_compiling():  # where fa4 cannot run, a small call fails as a large one would
            flash4.check_fa4_inputs(q)
        backend = "sdpa"
    if backend == "sdpa":
        with _sdpa_context(sdpa_kernel, q.device):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "xformers":
        if xops is None:
            raise RuntimeError("attention backend 'xformers': xformers is not installed (pip install 'mardini[gpu]'); "
                               "or use model.attn_backend=sdpa")
        bias = None
        if mask is not None:
            B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            # xformers wants an additive bias whose last dim is allocated to a multiple of 8.
            pad = (8 - Nk % 8) % 8
            full = torch.zeros(B, H, Nq, Nk + pad, dtype=q.dtype, device=q.device)
            full[..., :Nk].masked_fill_(~mask.expand(B, H, Nq, Nk), float("-inf"))
            bias = full[..., :Nk]
        try:
            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_bias=bias)
        except NotImplementedError as e:  # e.g. a wheel built for another torch / CUDA: its kernels do not load
            raise RuntimeError(f"xformers has no kernel for these inputs on {q.device} ({q.dtype}); its build may "
                               f"not match torch {torch.__version__} (python -m xformers.info); use "
                               f"model.attn_backend=sdpa\n{str(e)[:500]}") from e
        return out.transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


class RotaryEmbedding3D(nn.Module):
    """Rotary position embedding over (t, y, x).

    The head dimension is split into three even parts; each part rotates by angles proportional to one axis'
    coordinate. Time gets the remainder so that every axis has at least a few frequencies. Coordinates may be
    fractional: the generator's cross-attention places plan tokens at their centres on the high-resolution grid.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head_dim must be even and >= 6 for 3D RoPE, got {head_dim}")
        spatial = 2 * (head_dim // 6)
        self.dims = (head_dim - 2 * spatial, spatial, spatial)  # (t, y, x)
        self.theta = theta
        for name, d in zip(("t", "y", "x"), self.dims):
            inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
            self.register_buffer(f"inv_freq_{name}", inv_freq.float(), persistent=False)

    def angles(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords [N, 3] float (t, y, x) -> cos, sin [N, head_dim // 2]."""
        device = coords.device
        angles = torch.cat([coords[:, i:i + 1] * getattr(self, f"inv_freq_{name}").to(device)
                            for i, name in enumerate("tyx")], dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, frames: int, height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [frames * height * width, head_dim // 2] in (t, y, x) raster order."""
        return self.angles(grid_coords(frames, height, width, device=device or self.inv_freq_t.device))


def grid_coords(frames: int, height: int, width: int, device=None, spacing: float = 1.0,
                offset: float = 0.0) -> torch.Tensor:
    """(t, y, x) coordinates [frames * height * width, 3] in raster order; the spatial ones are
    ``offset + spacing * index`` (the time one is the frame index)."""
    t, y, x = torch.meshgrid(
        torch.arange(frames, device=device, dtype=torch.float32),
        offset + spacing * torch.arange(height, device=device, dtype=torch.float32),
        offset + spacing * torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([t.reshape(-1), y.reshape(-1), x.reshape(-1)], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x [..., d] by the angles in cos/sin, which broadcast against [..., d/2]
    (x [B, H, N, d] with cos [N, d/2]; token-major heads [B, N, H, d] with cos [N, 1, d/2])."""
    if torch.compiler.is_compiling():
        # pair (a, b) -> (a cos - b sin, a sin + b cos), written as (a, b) * cos + (b, a) * (-sin, sin): one pointwise
        # expression, which the compiler fuses with the norm before it into one kernel that runs a third faster than
        # the rotated halves stacked (benchmarks/prototypes/rope_fusion.py); the same values. Inductor does not
        # generate code for complex numbers.
        pairs = x.float().unflatten(-1, (-1, 2))                                        # [..., d/2, 2]
        signed_sin = torch.stack((-sin, sin), dim=-1)                                   # [..., d/2, 2]
        return (pairs * cos.unsqueeze(-1) + pairs.flip(-1) * signed_sin).flatten(-2).type_as(x)
    # Eager: each pair as one complex number times the rotation e^(i angle), one kernel forward and one backward
    # where the pointwise form runs four (8x faster forward, 3x faster with backward, on the CPU default job's q/k).
    pairs = x.float()
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs whole complex numbers in memory
    rotation = torch.complex(cos.float(), sin.float())                                  # [..., d/2]
    rotated = torch.view_as_complex(pairs.unflatten(-1, (-1, 2))) * rotation           # [..., d/2] complex
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def split_heads(x: torch.Tensor, parts: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """A projection's output [B, N, parts * D] -> parts tensors of token-major heads [B, N, H, d] (views)."""
    return x.unflatten(-1, (parts, num_heads, -1)).unbind(2)


def rotate_heads(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Token-major heads x [B, N, H, d] rotated by their tokens' rope (cos, sin) [N, d/2] (None: unrotated)."""
    return x if rope is None else apply_rope(x, rope[0].unsqueeze(-2), rope[1].unsqueeze(-2))


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """Token-major heads [B, N, H, d] -> the [B, H, N, d] view attention takes. The memory stays token-major, the
    projection's own layout: SDPA's GPU kernels read it as is and write their output in it, so neither the heads
    going in nor the output coming out is copied into another layout."""
    return x.transpose(1, 2)


def cat_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, H, N1, d] and [B, H, N2, d] -> [B, H, N1 + N2, d], concatenated in token-major memory (see heads_first)."""
    return heads_first(torch.cat([a.transpose(1, 2), b.transpose(1, 2)], dim=1))


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose weight follows the input's dtype, so that under bf16 autocast PyTorch takes its fused kernel
    (a float32 weight with a bf16 input falls back to a slow composite)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional qk RMS-normalisation (stabilises large models) and RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, backend: str = "sdpa",
                 sdpa_kernel: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.backend, self.sdpa_kernel = backend, sdpa_kernel
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """x [B, N, D] -> q, k, v each [B, H, N, d] (views of token-major memory: heads_first), normalised and
        rotated."""
        q, k, v = split_heads(self.qkv(x), 3, self.num_heads)
        q, k = rotate_heads(self.q_norm(q), rope), rotate_heads(self.k_norm(k), rope)
        return heads_first(q), heads_first(k), heads_first(v)

    def attend(self, q, k, v, mask=None) -> torch.Tensor:
        return attention(q, k, v, mask, backend=self.backend, sdpa_kernel=self.sdpa_kernel)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, N, d] -> [B, N, D]."""
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x, rope)
        return self.output(self.attend(q, k, v, mask))


class CrossAttention(nn.Module):
    """Queries from x [B, N, D] attend to a context [B, M, Dc] (the planning signals), whose keys and values
    (context_kv) are computed apart: generation computes them once for all its sampler steps.

    With ``rope_q`` / ``rope_k`` (cos, sin of [N, d/2] and [M, d/2]) queries and keys are rotated by their
    positions, so that a query can find the context tokens that cover its place."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qk_norm: bool = True,
                 backend: str = "sdpa", sdpa_kernel: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.backend, self.sdpa_kernel = backend, sdpa_kernel
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        head_dim = dim // num_heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def context_kv(self, context: torch.Tensor, rope_k=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The context's keys (normalised, rotated) and values [B, heads, M, d]: what the queries read. Generation
        computes them once per call, the plan being the same at every sampler step (Generator.cache_references)."""
        k, v = split_heads(self.kv(context), 2, self.num_heads)
        return heads_first(rotate_heads(self.k_norm(k), rope_k)), heads_first(v)

    def forward(self, x: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor], rope_q=None) -> torch.Tensor:
        """x: [B, N, D] queries; context_kv: context_kv(context, rope_k), the keys and values they read."""
        (q,) = split_heads(self.q(x), 1, self.num_heads)
        q = heads_first(rotate_heads(self.q_norm(q), rope_q))
        out = attention(q, *context_kv, backend=self.backend, sdpa_kernel=self.sdpa_kernel)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    """Feed-forward block: SwiGLU (gated, hidden width 2/3 of ratio * dim so the parameter count matches GELU)
    or a plain GELU MLP."""

    def __init__(self, dim: int, ratio: float = 4.0, kind: str = "swiglu"):
        super().__init__()
        self.kind = kind
        self.hidden = hidden = mlp_hidden(dim, ratio, kind)
        self.fc_in = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu" and not torch.is_grad_enabled() and type(self.fc_in) is nn.Linear:
            # Inference: the bias joins the gate's elementwise kernel. Compiled, fc_in's addmm feeding the gate
            # copies its bias into the whole output before the GEMM adds into it (1.4 ms of a 24.6 ms sampler step
            # of the paper generator on an H200). Training keeps the addmm: there the change measured no gain.
            # Layers of their own (FP8Linear, models/fp8.py) compute their bias themselves.
            h = F.linear(x, self.fc_in.weight)
            h = h + self.fc_in.bias.to(h.dtype)  # under autocast h is bf16, as the addmm's output would be
        else:
            h = self.fc_in(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc_out(h)


def mlp_hidden(dim: int, ratio: float, kind: str) -> int:
    """Hidden width of the MLP; SwiGLU's is rounded up to a multiple of 8 for efficient matmuls."""
    if kind == "swiglu":
        return max(8, (int(2 * ratio * dim / 3) + 7) // 8 * 8)
    if kind == "gelu":
        return int(ratio * dim)
    raise ValueError(f"unknown mlp type {kind!r}; choose 'swiglu' or 'gelu'")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift (shift/scale broadcast over the token axis)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Embeds scalar diffusion times (in [0, 1000]) with sinusoids followed by a two-layer MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_dim, self.max_period = frequency_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoids(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[..., None] * freqs
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: any shape [...] -> [..., dim]."""
        emb = self.sinusoids(t)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def box_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average f x f cells of the last two dims: [..., H, W] -> [..., H/f, W/f]. The one low-resolution filter of the
    project: the planner's input from hi-res latents, and the pixel view of the `pixels` low-res mode."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"downsampling factor must be a positive int, got {factor!r}")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"size {h}x{w} is not divisible by the downsampling factor {factor}")
    if factor == 1:
        return x
    lead = x.shape[:-2]
    y = F.avg_pool2d(x.reshape(-1, 1, h, w), factor)
    return y.reshape(*lead, h // factor, w // factor)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T, (H/p)*(W/p), C*p*p]."""
    return rearrange(x, "b t c (h p1) (w p2) -> b t (h w) (c p1 p2)", p1=patch_size, p2=patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """[B, T, (H/p)*(W/p), C*p*p] -> [B, T, C, H, W]; height/width are in latent cells."""
    return rearrange(x, "b t (h w) (c p1 p2) -> b t c (h p1) (w p2)",
                     h=height // patch_size, w=width // patch_size, p1=patch_size, p2=patch_size)
