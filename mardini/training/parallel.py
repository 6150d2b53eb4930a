"""Parallelism applied to an unchanged MarDini from outside (torchtitan's pattern), one transformer block at a time.

- activation checkpointing per block (composable API: parameter names stay the same, so checkpoints and EMA
  do not care whether it is on);
- ``torch.compile`` per block, or per network (``train.compile_scope``; ``Module.compile`` also keeps names);
- FSDP2 (``fully_shard``) per block and then the root, with bf16 parameters and fp32 gradient reduction. The
  forward inputs are never cast: latents, noise and timesteps reach the model in fp32 and the trainer's autocast
  casts the networks' ops, exactly as under DDP, so both train the same objective.

Sharded training state is saved with torch.distributed.checkpoint (see checkpoint.py), which reshards on load, so
a run can continue on a different number of processes.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from .config import COMPILE_SCOPES, PARALLEL_MODES, compile_scope_conflict

log = logging.getLogger(__name__)


def transformer_blocks(model) -> list[nn.Module]:
    return list(model.planner.blocks) + list(model.generator.blocks)


def apply_activation_checkpointing(model) -> None:
    from torch.distributed._composable import checkpoint

    for block in transformer_blocks(model):
        checkpoint(block)


# The frame counts (G, R) that shape `gather` identity attention and change with the mask: GeneratorBlock.forward's
# counts (compile_scope=blocks) and Generator.forward's frame_counts (compile_scope=networks)
FRAME_COUNT_SOURCES = ("L['counts'][0]", "L['counts'][1]", "L['frame_counts'][0]", "L['frame_counts'][1]")


def compile_frame_counts_dynamic() -> None:
    """Make the generator blocks' frame counts symbolic in their first graph. Left to torch.compile, they are
    constants in it and each turns symbolic at its first change, so a curriculum's masks cost two recompilations
    (three graphs; with training_frame_counts' floor of 2) per process at the start of a run: 15-17 s each for the
    paper generator block on an H200. Process-wide (torch.compiler.config), and only these names."""
    config = torch.compiler.config
    if not hasattr(config, "dynamic_sources"):  # older torch: the counts turn symbolic at their first change
        return
    present = [s for s in config.dynamic_sources.split(",") if s]
    config.dynamic_sources = ",".join([*present, *(s for s in FRAME_COUNT_SOURCES if s not in present)])


def apply_compile(model, motion: bool = True, scope: str = "blocks", **compile_kwargs) -> None:
    """scope blocks: each transformer block (what FSDP2 and activation checkpointing wrap); networks: the planner's
    and the generator's whole forward, so that the glue between blocks (embeddings, RoPE, adaLN, the identity
    attention's gathers) is fused too and each network is one call on the host: when the GPU's work per step is small
    (the `small` planner at planner.patch_size=2) the host's launches bound the step (BENCHMARKS.md)."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"train.compile_scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    compile_frame_counts_dynamic()
    modules = transformer_blocks(model) if scope == "blocks" else [model.planner, model.generator]
    for module in modules:
        module.compile(**compile_kwargs)
    if motion:
        model.compile_motion(**compile_kwargs)


def apply_fsdp(model, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True, device_type: str | None = None) -> None:
    """Shard every block, then the remaining parameters at the root. Needs an initialised process group.

    cast_forward_inputs=False: FSDP's default would cast the root's inputs (latents, noise, timesteps) to bf16
    and change the training target; run the forward under autocast instead (the trainer does)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("FSDP needs torch.distributed to be initialised (launch with torchrun/accelerate)")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None,
                              cast_forward_inputs=False)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def parallelize(model, mode: str = "ddp", activation_checkpointing: bool = False, compile: bool = False,
                param_dtype: torch.dtype | None = None, compile_motion: bool = True,
                compile_scope: str = "blocks") -> None:
    """In place. mode 'fsdp' shards when a process group exists (a single plain process keeps the model whole but
    still uses the sharded checkpoint format); 'ddp' leaves wrapping to Accelerate. compile_scope=networks needs
    the blocks unwrapped (no FSDP, no activation checkpointing)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    conflict = compile_scope_conflict(compile_scope, mode, activation_checkpointing) if compile else ""
    if conflict:
        raise ValueError(f"train.compile_scope=networks {conflict}")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model, motion=compile_motion, scope=compile_scope)
    if mode == "fsdp" and dist.is_initialized():
        apply_fsdp(model, param_dtype=param_dtype)
        log.info("FSDP2: %d blocks sharded over %d processes", len(transformer_blocks(model)), dist.get_world_size())


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (collective); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def set_gradient_sync(model, enabled: bool) -> None:
    """FSDP2's counterpart of DDP's no_sync: skip the reduce-scatter on accumulation micro-steps."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def clip_grad_norm(params, max_norm: float) -> float:
    """Global grad norm (clipped to max_norm); works for DTensor (sharded) and plain gradients."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full_tensor(norm))
