"""`train.deterministic=true`: the same seed trains the same weights, bit for bit, on the GPU.

Why it is not so by default: compiled training picks some kernels by timing them while it runs (Inductor tries
several launch configurations of a reduction, or pads a matmul, and keeps the fastest; cuDNN may do the same), and a
few CUDA kernels add with atomics in whatever order threads arrive. Two launches of one seed then round differently
within the first steps, and the difference grows: two launches of `small_photo_motion` at seed 1 on one H100 scored
their periodic samples 1 dB apart by step 2000 (BENCHMARKS.md, "A second seed of batch 16 for the photographs"). That
is harmless for a result averaged over seeds, but it hides whether a code change altered a run.

This mode fixes every choice in advance, at a cost in speed (measured in BENCHMARKS.md): PyTorch's deterministic
algorithms (an op that has none stops the run with PyTorch's error naming it), Inductor's deterministic mode (no
timing-based choice of kernels), cuDNN without autotuning, and the cuBLAS workspace setting that cuBLAS needs for
reproducible sums. It holds for one machine kind and one software stack; CPU training is deterministic without it.
Kernels from outside PyTorch (`model.attn_backend=fa4`, `xformers`) are not covered by these switches.
"""
from __future__ import annotations

import os

import torch
import torch._inductor.config as inductor_config

# cuBLAS gives reproducible results only with a fixed workspace; either value that CUDA's documentation names works.
CUBLAS_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


def enable_determinism() -> None:
    """Switch this process to deterministic kernels (process-wide, like the random seed); call before the first
    CUDA matmul and before anything is compiled, so that cuBLAS and Inductor see it."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC_WORKSPACES:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC_WORKSPACES[0]
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    inductor_config.deterministic = True


def determinism_enabled() -> bool:
    """Whether enable_determinism's switches are on in this process."""
    return (torch.are_deterministic_algorithms_enabled() and bool(inductor_config.deterministic)
            and os.environ.get("CUBLAS_WORKSPACE_CONFIG") in CUBLAS_DETERMINISTIC_WORKSPACES)
