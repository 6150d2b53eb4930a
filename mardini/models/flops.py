"""Analytic FLOP counts (a multiply-add counts 2) for MFU, in the spirit of nanoGPT's estimate_mfu.

Only matrix products and attention are counted; norms, activations and adaLN's elementwise work are negligible.
``executed=False`` counts the model's useful work (identity attention: generated-frame queries x all keys +
reference queries x own frame), the figure MFU is quoted on; ``executed=True`` counts what the configured kernels
actually compute (the ``split`` identity implementation runs both a full and a per-frame attention), which a
FLOP counter would report. ``cached_references=True`` counts a sampler step that runs the generated frames only
(Generator.cache_references): their tokens, and their queries against every key; their plan's cross-attention keys
and values come from the cache too.
"""

from __future__ import annotations

from .config import MarDiniConfig, motion_input_blocks
from .layers import mlp_hidden


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def _mlp(tokens: int, dim: int, ratio: float, kind: str) -> int:
    hidden = mlp_hidden(dim, ratio, kind)
    fan_out = 2 * hidden if kind == "swiglu" else hidden
    return _linear(tokens, dim, fan_out) + _linear(tokens, hidden, dim)


def _attention_core(query_key_pairs: int, head_dims_total: int) -> int:
    """QK^T and AV: 2 products of 2 * pairs * d each."""
    return 4 * query_key_pairs * head_dims_total


def planner_flops(cfg: MarDiniConfig, num_frames: int, lowres_hw: tuple[int, int], batch_size: int = 1) -> int:
    p = cfg.planner
    n = (lowres_hw[0] // p.patch_size) * (lowres_hw[1] // p.patch_size)
    N = num_frames * n
    per_block = _linear(N, p.dim, 3 * p.dim) + _linear(N, p.dim, p.dim) + _attention_core(N * N, p.dim)
    per_block += _mlp(N, p.dim, p.mlp_ratio, cfg.mlp_type)
    total = p.depth * per_block
    total += _linear(N, cfg.latent_channels * p.patch_size**2, p.dim) + _linear(N, p.dim, cfg.signal_dim)
    return batch_size * total


def generator_flops(cfg: MarDiniConfig, num_frames: int, latent_hw: tuple[int, int], lowres_hw: tuple[int, int],
                    num_masked: int, batch_size: int = 1, executed: bool = False,
                    cached_references: bool = False) -> int:
    g = cfg.generator
    n = (latent_hw[0] // g.patch_size) * (latent_hw[1] // g.patch_size)
    m = (lowres_hw[0] // cfg.planner.patch_size) * (lowres_hw[1] // cfg.planner.patch_size)
    T, N = num_frames, num_frames * n
    full_pairs, own_pairs = N * N, N * n
    if cached_references:  # only the generated frames' tokens run: G frames of queries against all N keys
        if g.attention == "full":
            raise ValueError("reference frames cannot be cached under full attention")
        pairs = num_masked * n * (N if g.attention == "identity" else n)
        T, N = num_masked, num_masked * n
    elif g.attention == "full":
        pairs = full_pairs
    elif g.attention == "spatial":
        pairs = own_pairs
    elif executed and g.identity_impl == "split":
        pairs = full_pairs + own_pairs
    elif executed and g.identity_impl == "mask":  # dense mask: the kernel computes every pair
        pairs = full_pairs
    else:  # the useful pairs; what identity_impl=gather executes for a clip (a batch pads to its largest count)
        pairs = num_masked * n * N + (T - num_masked) * n * n
    per_block = _linear(N, g.dim, 3 * g.dim) + _linear(N, g.dim, g.dim) + _attention_core(pairs, g.dim)
    per_block += _linear(N, g.dim, g.dim)                                             # cross q
    if not cached_references:  # cross kv (a cached step reads the plan's keys and values from the cache)
        per_block += _linear(T * m, cfg.signal_dim, 2 * g.dim)
    per_block += _attention_core(T * n * m, g.dim) + _linear(N, g.dim, g.dim)       # cross core, proj
    per_block += _mlp(N, g.dim, g.mlp_ratio, cfg.mlp_type)
    per_block += _linear(T, g.dim, 6 * g.dim)                                         # adaLN (per frame)
    patch_dim = cfg.latent_channels * g.patch_size**2
    total = g.depth * per_block + _linear(N, patch_dim, g.dim) + _linear(N, g.dim, patch_dim)
    if cfg.motion.estimate != "none":  # the motion input's patch embedding (the matcher itself has no matmul)
        total += _linear(N, patch_dim * motion_input_blocks(cfg.motion), g.dim)
    total += _linear(T, g.dim, 2 * g.dim) + _linear(T, 256, g.dim) + _linear(T, g.dim, g.dim)  # final adaLN, t-embed
    return batch_size * total


def mardini_flops(cfg: MarDiniConfig, num_frames: int, latent_hw: tuple[int, int], num_masked: int | None = None,
                  batch_size: int = 1, lowres_hw: tuple[int, int] | None = None, executed: bool = False,
                  noise_draws: int = 1) -> dict:
    """Forward FLOPs of the planner and of one generator call (noise_draws calls in training, train.noise_draws);
    a training step costs about 3x the sum."""
    if lowres_hw is None:
        lowres_hw = (latent_hw[0] // cfg.lowres_factor, latent_hw[1] // cfg.lowres_factor)
    if num_masked is None:
        num_masked = num_frames - 1
    planner = planner_flops(cfg, num_frames, lowres_hw, batch_size)
    generator = noise_draws * generator_flops(cfg, num_frames, latent_hw, lowres_hw, num_masked, batch_size, executed)
    generator += match_features_flops(cfg, num_frames, latent_hw, batch_size)  # counted with the generator it feeds
    return {"planner": planner, "generator": generator, "total": planner + generator}


def match_features_flops(cfg: MarDiniConfig, num_frames: int, latent_hw: tuple[int, int], batch_size: int = 1) -> int:
    """A learned motion estimate's feature network (models/motion.py MatchFeatures) on every latent frame: four 3x3
    convolutions and a 1x1 one per cell. 0 without one (the matcher itself has no matmul)."""
    m = cfg.motion
    if m.estimate != "learned":
        return 0
    cells = batch_size * num_frames * latent_hw[0] * latent_hw[1]
    w = m.feature_width
    return _linear(cells, 9 * cfg.latent_channels, w) + 3 * _linear(cells, 9 * w, w) + _linear(cells, w, m.feature_dim)
