"""Shared by the model tests: overfit one fixed batch and return the losses; count the frames each generator block
runs; re-initialise a model at random."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def fit_fixed_batch(model, z, mask, diffusion, noise, t, steps: int, lr: float = 2e-3) -> list[float]:
    """Adam on the diffusion loss of one batch (fixed noise and t) for `steps` steps; the loss after each."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(z, None, mask, diffusion, noise=noise, t=t)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@contextmanager
def frames_seen_by_blocks(model):
    """Within the block: the frame count of every generator block call ([B, T, n, D] inputs) is appended to the
    yielded list. Why: a cached sampler step must run the generated frames only; equal samples alone cannot tell
    a cached step from a full one."""
    seen = []
    hooks = [block.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
             for block in model.generator.blocks]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def randomize(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Re-initialise every parameter at random (norm gains around 1), so that no zero-initialised layer makes a
    dependence vanish."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g) * std
                is_gain = isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and name == "weight"
                p.copy_(noise + (1.0 if is_gain else 0.0))
    return module
