"""Exponential moving average of the weights: the model that gets exported and sampled from.

The shadow copy is kept in float32 whatever the training precision, and updated with a warm-up
(decay_t = min(decay, (1 + t) / (warmup + t)), warmup 10 by default) so early EMA weights are not dominated by the
random init. Until decay_t reaches `decay` (step (warmup * decay - 1) / (1 - decay): 8 991 for 0.999 and warmup 10)
the warm-up alone sets the average: it then weighs step s of t about as (s / t)^(warmup - 2), an average over the
last ~1 / (warmup - 1) of the run, whatever `decay` says.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: float = 10.0):
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        t = self.num_updates
        return min(self.decay, (1 + t) / (self.warmup + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        shadows = [self.shadow[n] for n in names]
        params = [p.detach().float() for n, p in model.named_parameters() if p.requires_grad]
        torch._foreach_lerp_(shadows, params, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into a model with the same parameter names."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
        self.num_updates = num_updates
