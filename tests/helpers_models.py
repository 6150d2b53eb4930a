"""Shared by the model tests: overfit one fixed batch and return the losses."""

from __future__ import annotations

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
