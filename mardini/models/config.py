"""Model configurations as plain dataclasses, and the table of named sizes.

They double as Hydra structured configs (only str/int/float/bool fields and nested dataclasses), but the models
never import Hydra: ``MarDini(MarDiniConfig(...))`` works from a notebook.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from .layers import ATTENTION_BACKENDS, SDPA_KERNELS
from .motion import MOTION_ESTIMATES

GENERATOR_ATTENTION = ("identity", "full", "spatial")
IDENTITY_IMPLS = ("split", "mask", "gather")
MLP_TYPES = ("swiglu", "gelu")


@dataclass
class PlannerConfig:
    dim: int = 256          # transformer width
    depth: int = 4          # number of blocks
    num_heads: int = 4      # attention heads (head dim = dim / num_heads)
    patch_size: int = 1     # latent cells per token side, on the low-resolution latents
    mlp_ratio: float = 4.0  # MLP hidden width / dim
    loss_weight: float = 0.0  # weight of the planner's own loss (a linear read-out of each generated frame's plan
    #                           regresses its low-resolution latents); 0: the diffusion loss alone, as the paper


@dataclass
class GeneratorConfig:
    dim: int = 128          # transformer width
    depth: int = 4          # number of blocks
    num_heads: int = 4      # attention heads (head dim = dim / num_heads)
    patch_size: int = 2     # latent cells per token side, on the high-resolution latents
    mlp_ratio: float = 4.0  # MLP hidden width / dim
    attention: str = "identity"   # identity | full | spatial  (see generator.py)
    identity_impl: str = "gather"  # gather: each query once | split: full + own-frame attention for all | mask: dense


@dataclass
class MotionConfig:
    """The generator's motion-compensated estimate of each generated frame (motion.py)."""
    estimate: str = "none"      # none | bilateral (coarse-to-fine soft bilateral matching between the given frames)
    #                             | learned (the same, its costs also comparing learned features of the frames)
    residual: bool = False      # diffuse the generated frames' difference from the estimate instead of the frames
    residual_scale: float = 1.0  # with residual: the difference is multiplied by this before diffusion
    pair: bool = False          # also give the generator the two matched frames (occlusions: it can pick one side)
    plan_layout: bool = False   # also give it the planner's read-out of each generated frame (planner.loss_weight > 0)
    radius: int = 2             # candidate displacements per pyramid level: +-radius latent cells
    levels: int = 3             # pyramid levels (each halves the resolution; motion up to radius*(2^levels-1) cells)
    coarse_radius: int = 0      # radius of the levels above the finest (0: radius); 3 at 3 levels reaches 20 cells
    window: int = 5             # matching neighbourhood, latent cells per side (odd)
    smoothness: float = 3e-3    # cost per squared latent cell of displacement, in units of the frames' variance
    #                             (per frame of the scene: a window of frames k apart uses smoothness / k^2)
    temperature: float = 0.06   # softmax temperature of the matching costs (mean squared difference / variance)
    feature_dim: int = 16       # learned: channels of the matching features
    feature_width: int = 32     # learned: width of the feature network's dilated convolutions
    loss_weight: float = 1.0    # learned: weight of the motion loss (the estimate's error on the frames it estimates)


@dataclass
class MarDiniConfig:
    latent_channels: int = 4      # channels of the autoencoder's latents
    lowres_factor: int = 2        # r: the planner sees latents downsampled r times along H and W
    max_frames: int = 17          # longest window the model accepts (RoPE has no table; this is a guard)
    cond_dim: int = 0             # width of the planning signals; 0 = the generator's dim
    mlp_type: str = "swiglu"      # swiglu | gelu
    qk_norm: bool = True          # RMS-normalise queries and keys (stabilises large models)
    rope_theta: float = 10000.0   # RoPE base period
    attn_backend: str = "sdpa"    # sdpa | xformers (`gpu` extra; on an H200 its bf16 kernel is FlashAttention-2) |
    #                               fa4 (FlashAttention-4, `fa4` extra; Hopper/Blackwell, bf16: trains 6-9 % faster)
    sdpa_kernel: str = "auto"     # auto (cuDNN first on Hopper, else PyTorch's) | flash | efficient | cudnn | math
    plan_dropout: float = 0.0     # probability of replacing a sample's plan by a learned null plan (for CFG)
    planner: PlannerConfig = field(default_factory=PlannerConfig)        # the planning transformer (low-res latents)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)  # the diffusion transformer (high-res latents)
    motion: MotionConfig = field(default_factory=MotionConfig)  # motion-compensated estimate given to the generator

    def __post_init__(self):
        validate_model_config(self)

    @property
    def signal_dim(self) -> int:
        return self.cond_dim or self.generator.dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MarDiniConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        subs = (("planner", PlannerConfig), ("generator", GeneratorConfig), ("motion", MotionConfig))
        for key, sub in subs:
            unknown = set(d.get(key, {})) - {f.name for f in fields(sub)}
            if unknown:
                raise ValueError(f"unknown model config keys: {sorted(f'{key}.{k}' for k in unknown)}")
        return cls(**{key: sub(**d.pop(key, {})) for key, sub in subs}, **d)


def motion_input_blocks(motion) -> int:
    """Latent-channel blocks of the generator's motion input: the estimate, the two matched frames with pair, the
    plan's layout with plan_layout (MotionConfig or an OmegaConf node)."""
    return 1 + 2 * bool(motion.pair) + bool(motion.plan_layout)


def validate_model_config(cfg) -> None:
    """Raise ValueError naming the first bad field (works on dataclasses and OmegaConf nodes)."""

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ValueError(f"model.{key} {msg}")

    need(cfg.latent_channels >= 1, "latent_channels", f"must be >= 1, got {cfg.latent_channels}")
    need(cfg.lowres_factor >= 1, "lowres_factor", f"must be >= 1, got {cfg.lowres_factor}")
    need(cfg.max_frames >= 2, "max_frames", f"must be >= 2, got {cfg.max_frames}")
    need(cfg.cond_dim >= 0, "cond_dim", f"must be >= 0, got {cfg.cond_dim}")
    need(cfg.mlp_type in MLP_TYPES, "mlp_type", f"must be one of {MLP_TYPES}, got {cfg.mlp_type!r}")
    need(cfg.attn_backend in ATTENTION_BACKENDS, "attn_backend",
         f"must be one of {ATTENTION_BACKENDS}, got {cfg.attn_backend!r}")
    need(cfg.attn_backend != "fa4" or cfg.generator.identity_impl != "mask", "attn_backend",
         "fa4 takes no attention mask: set model.generator.identity_impl=gather or split (the same attention)")
    need(cfg.sdpa_kernel in SDPA_KERNELS, "sdpa_kernel", f"must be one of {SDPA_KERNELS}, got {cfg.sdpa_kernel!r}")
    need(0.0 <= cfg.plan_dropout < 1.0, "plan_dropout", f"must be in [0, 1), got {cfg.plan_dropout}")
    need(cfg.rope_theta > 0, "rope_theta", f"must be > 0 (RoPE's base period), got {cfg.rope_theta}")
    for name in ("planner", "generator"):
        sub = getattr(cfg, name)
        for key in ("dim", "depth", "num_heads", "patch_size"):
            need(getattr(sub, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(sub, key)}")
        need(sub.mlp_ratio > 0, f"{name}.mlp_ratio", f"must be > 0, got {sub.mlp_ratio}")
        need(sub.dim % sub.num_heads == 0, f"{name}.dim",
             f"({sub.dim}) must be divisible by {name}.num_heads ({sub.num_heads})")
        head_dim = sub.dim // sub.num_heads
        need(head_dim % 2 == 0 and head_dim >= 6, f"{name}.num_heads",
             f"gives head dim {head_dim}; 3D RoPE needs an even head dim >= 6")
    need(cfg.planner.loss_weight >= 0, "planner.loss_weight", f"must be >= 0, got {cfg.planner.loss_weight}")
    need(cfg.generator.attention in GENERATOR_ATTENTION, "generator.attention",
         f"must be one of {GENERATOR_ATTENTION}, got {cfg.generator.attention!r}")
    motion = cfg.motion
    need(motion.estimate in MOTION_ESTIMATES, "motion.estimate",
         f"must be one of {MOTION_ESTIMATES}, got {motion.estimate!r}")
    need(not motion.residual or motion.estimate != "none", "motion.residual",
         "needs an estimate to be the residual of: set model.motion.estimate=bilateral")
    need(not motion.pair or motion.estimate != "none", "motion.pair",
         "needs an estimate whose matched frames to give: set model.motion.estimate=bilateral")
    need(not motion.plan_layout or (motion.estimate != "none" and cfg.planner.loss_weight > 0), "motion.plan_layout",
         "needs a motion estimate to sit beside and the planner's read-out: set model.motion.estimate and "
         f"model.planner.loss_weight > 0 (got {motion.estimate!r}, {cfg.planner.loss_weight})")
    need(motion.residual_scale > 0 and (motion.residual or motion.residual_scale == 1.0), "motion.residual_scale",
         f"must be > 0, and 1 unless model.motion.residual is set; got {motion.residual_scale}")
    for key in ("radius", "levels"):
        need(getattr(motion, key) >= 1, f"motion.{key}", f"must be >= 1, got {getattr(motion, key)}")
    need(motion.coarse_radius >= 0, "motion.coarse_radius", f"must be >= 0 (0: radius), got {motion.coarse_radius}")
    need(motion.window >= 1 and motion.window % 2 == 1, "motion.window", f"must be odd and >= 1, got {motion.window}")
    need(motion.smoothness >= 0, "motion.smoothness", f"must be >= 0, got {motion.smoothness}")
    need(motion.temperature > 0, "motion.temperature", f"must be > 0, got {motion.temperature}")
    if motion.estimate == "learned":
        need(motion.temperature >= 0.1, "motion.temperature",
             f"must be >= 0.1 with a learned estimate (got {motion.temperature}): a sharper softmax passes the features "
             f"almost no gradient (norms ~1e-8 at 0.06, BENCHMARKS.md, 'Learning'); 0.3 trains them")
        for key in ("feature_dim", "feature_width"):
            need(getattr(motion, key) >= 1, f"motion.{key}", f"must be >= 1, got {getattr(motion, key)}")
        need(motion.loss_weight > 0, "motion.loss_weight", f"must be > 0 with a learned estimate, got "
             f"{motion.loss_weight} (nothing else trains the features)")
    need(cfg.generator.identity_impl in IDENTITY_IMPLS, "generator.identity_impl",
         f"must be one of {IDENTITY_IMPLS}, got {cfg.generator.identity_impl!r}")


# Named sizes, in the spirit of DiT's table (a size may also set top-level fields). Parameter counts (printed by
# `MarDini.num_parameters`; the latent channels change only the patch embeddings): tiny ~0.6M, small ~19M, base
# ~178M, paper ~1.21B planner + ~0.28B generator.
MODEL_SIZES: dict[str, dict] = {
    # tiny: the CPU default job. Head dims 32 / 48, a RoPE base for grids of ~10 tokens and no qk-norm learned
    # interpolation fastest in 500-step CPU runs (BENCHMARKS.md, "Learning"); a generator width of 48 trained
    # 1.6 dB worse.
    "tiny": dict(qk_norm=False, rope_theta=100.0, planner=dict(dim=64, depth=2, num_heads=2),
                 generator=dict(dim=96, depth=2, num_heads=2)),
    # small: the planner in heads of 128, as the paper's: cuDNN runs its attention 28 % faster than in heads of 64,
    # the research step 12 % faster, same sample quality (BENCHMARKS.md, "Heads of 128 in the `small` planner").
    "small": dict(planner=dict(dim=384, depth=8, num_heads=3), generator=dict(dim=192, depth=6, num_heads=3)),
    "base": dict(planner=dict(dim=1024, depth=12, num_heads=16), generator=dict(dim=384, depth=8, num_heads=6)),
    # paper: the generator attends with head dim 128 (8 heads), like the planner: its step is attention-bound, and
    # cuDNN's attention runs 17 % faster at head dim 128 than at 64 (same parameters; one H200: generator step 46.0 ->
    # 53.9 % MFU, 25-step inference 0.96 -> 0.84 s; BENCHMARKS.md, "GPU performance, second step").
    "paper": dict(planner=dict(dim=2048, depth=24, num_heads=16), generator=dict(dim=1024, depth=12, num_heads=8)),
}


def model_config(size: str, **overrides) -> MarDiniConfig:
    """A named size with top-level overrides, e.g. ``model_config("tiny", latent_channels=12)``."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    d = copy.deepcopy(MODEL_SIZES[size])
    for key in ("planner", "generator", "motion"):
        d.setdefault(key, {}).update(overrides.pop(key, {}))
    d.update(overrides)
    return MarDiniConfig.from_dict(d)


def as_model_config(cfg) -> MarDiniConfig:
    """Accept a MarDiniConfig, a plain dict or an OmegaConf node and return a validated MarDiniConfig."""
    if isinstance(cfg, MarDiniConfig):
        return cfg
    if is_dataclass(cfg):
        return MarDiniConfig.from_dict(asdict(cfg))
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return MarDiniConfig.from_dict(cfg)
