"""The optimizers and the learning-rate schedule.

AdamW with weight decay on matrices only (nanoGPT's rule), or Muon (Jordan et al., 2024: momentum orthogonalised
by a Newton-Schulz iteration) on the transformer blocks' weight matrices with AdamW for everything else; a warm-up
+ cosine/constant schedule for both.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, train_cfg, fused: bool | None = None) -> torch.optim.Optimizer:
    """Trainable parameters only; 2D+ tensors decay, biases/norms/tokens do not. With train.optimizer=muon the
    weight matrices inside transformer blocks (attention, MLP, cross-attention, adaLN) take Muon steps; the patch
    embeddings, output layers, embeddings and vectors stay on AdamW, as Muon's authors advise."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters (are both the planner and the generator frozen?)")
    t = train_cfg
    if getattr(t, "optimizer", "adamw") == "muon":
        hidden = [p for n, p in named if p.ndim == 2 and ".blocks." in f".{n}"]
        taken = {id(p) for p in hidden}
        rest = [(n, p) for n, p in named if id(p) not in taken]
        groups = [{"params": hidden, "weight_decay": t.weight_decay, "muon": True},
                  {"params": [p for _, p in rest if p.ndim >= 2], "weight_decay": t.weight_decay, "muon": False},
                  {"params": [p for _, p in rest if p.ndim < 2], "weight_decay": 0.0, "muon": False}]
        return MuonAdamW([g for g in groups if g["params"]], lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                         momentum=t.muon_momentum)
    params = [p for _, p in named]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused or None)


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """[m, n] -> a matrix with the same singular vectors and singular values pushed towards 1 (roughly U V^T).

    The quintic Newton-Schulz iteration of Muon, with its published coefficients (3.4445, -4.7750, 2.0315): it
    trades exactness (singular values land in about [0.7, 1.2]) for speed, which does not hurt as an update.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T  # iterate on the short side: X X^T is the smaller Gram matrix
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(update.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups marked ``muon=True`` (2D weights), AdamW for the others, in one optimizer.

    One optimizer, not two, so that the LR scheduler, gradient clipping and checkpoints (Accelerate's and the
    sharded format's) see a single object. A Muon step: Nesterov momentum on the gradient, orthogonalised, scaled
    by 0.2 sqrt(max(m, n)) so that its RMS matches a typical AdamW update (Liu et al., 2025, "Muon is scalable"):
    the same ``lr`` and decoupled weight decay serve both kinds of group. Weights must be whole matrices: the
    sharded (FSDP) trainer refuses Muon (validate_config).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=weight_decay,
                                      muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1.0 - lr * wd)
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1.0 - group["momentum"])
                    nesterov = p.grad.lerp(buf, group["momentum"])
                    scale = 0.2 * max(p.shape) ** 0.5
                    p.add_(orthogonalize(nesterov), alpha=-lr * scale)
                else:
                    beta1, beta2 = group["betas"]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    step = float(state["step"])
                    state["exp_avg"].lerp_(p.grad, 1.0 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                    denom = (state["exp_avg_sq"] / (1.0 - beta2**step)).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1**step))
        return loss


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based optimizer step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    t = train_cfg
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.lr_schedule, t.min_lr_ratio))
