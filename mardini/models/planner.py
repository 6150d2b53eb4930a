"""The planning model: masked auto-regression (MAR) over low-resolution latents of all frames.

It holds most of MarDini's parameters but sees few tokens: every frame at low resolution, the frames to be
generated replaced by one learned mask token. Full spatio-temporal attention (every token sees every token) lets
it reason about motion across the whole window; its output is one set of "planning signals" per frame that the
generator reads through cross-attention. It runs once per generation, not once per denoising step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.diffusion import masked_frame_mse
from .config import MarDiniConfig
from .layers import MLP, RMSNorm, RotaryEmbedding3D, SelfAttention, patchify, unpatchify


class PlannerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, cfg: MarDiniConfig):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = SelfAttention(dim, num_heads, cfg.qk_norm, cfg.attn_backend, cfg.sdpa_kernel)
        self.norm2 = RMSNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, cfg.mlp_type)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class Planner(nn.Module):
    def __init__(self, cfg: MarDiniConfig):
        super().__init__()
        p = cfg.planner
        self.cfg, self.patch_size = cfg, p.patch_size
        self.patch_embed = nn.Linear(cfg.latent_channels * p.patch_size**2, p.dim)
        self.mask_token = nn.Parameter(torch.zeros(p.dim))
        self.rope = RotaryEmbedding3D(p.dim // p.num_heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(PlannerBlock(p.dim, p.num_heads, p.mlp_ratio, cfg) for _ in range(p.depth))
        self.norm = RMSNorm(p.dim)
        self.to_signal = nn.Linear(p.dim, cfg.signal_dim)
        # Training only (planner.loss_weight > 0): reads each plan token back into the latent patch it covers.
        self.readout = nn.Linear(cfg.signal_dim, cfg.latent_channels * p.patch_size**2) if p.loss_weight > 0 else None
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, z_lo: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z_lo: [B, T, C, h, w] low-resolution latents; mask: [B, T] bool (True = frame to generate; its latent
        is never read). Returns planning signals [B, T, n_lo, signal_dim] with n_lo = (h/p)*(w/p)."""
        B, T, _, h, w = z_lo.shape
        if T > self.cfg.max_frames:
            raise ValueError(f"{T} frames exceed model.max_frames={self.cfg.max_frames}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"low-res latent size {h}x{w} not divisible by planner.patch_size={self.patch_size}")
        tokens = self.patch_embed(patchify(z_lo, self.patch_size))  # [B, T, n, D]
        # Masked frames carry no information: their tokens become the learned mask token.
        tokens = torch.where(mask[:, :, None, None], self.mask_token.to(tokens.dtype), tokens)
        n = tokens.shape[2]
        x = tokens.reshape(B, T * n, -1)
        rope = self.rope(T, h // self.patch_size, w // self.patch_size, device=x.device)
        for block in self.blocks:
            x = block(x, rope)
        return self.to_signal(self.norm(x)).reshape(B, T, n, -1)

    def readout_frames(self, signals: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The read-out of planning signals [B, T, n_lo, Dc] as low-resolution latents [B, T, C, h, w] (h x w: the
        planner's input size, in latent cells)."""
        if self.readout is None:
            raise ValueError("the plan's read-out needs a planner built with planner.loss_weight > 0")
        return unpatchify(self.readout(signals), self.patch_size, height, width)

    def readout_loss(self, signals: torch.Tensor, z_lo: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The planner's own loss: mean squared error of a linear read-out of the generated frames' planning signals
        [B, T, n_lo, Dc] against their low-resolution latents z_lo [B, T, C, h, w] (the tokens the planner never saw),
        weighted like the diffusion loss. Why: trained by the diffusion loss alone, the plan of a generated frame
        collapses to nearly one vector per frame that says nothing about where things are (BENCHMARKS.md,
        "Learning"); asked to carry each frame's low-resolution layout, it does, and the generator reads it."""
        if self.readout is None:
            raise ValueError("readout_loss needs a planner built with planner.loss_weight > 0")
        return masked_frame_mse(self.readout(signals.float()), patchify(z_lo, self.patch_size).float(), mask)
