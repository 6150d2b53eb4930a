"""Shared by the model tests: overfit one fixed batch and return the losses; count the frames each generator block
runs."""

from __future__ import annotations

from contextlib import contextmanager

import torch


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
