"""The run configuration: the schema behind the Hydra YAMLs in configs/.

Every field has a default and a trailing comment (docs/CONFIG.md is generated from them by
scripts/config_reference.py). Registered with Hydra's ConfigStore as ``mardini_schema`` so that an unknown key or a
wrong type fails at composition, naming the key; ``validate_config`` then checks values and cross-field
consistency before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import List, Optional

from omegaconf import OmegaConf

from ..data.synthetic import SyntheticVideoConfig
from ..data.video import VideoDataConfig, read_video_config
from ..diffusion.config import DiffusionConfig, validate_diffusion_config
from ..masking import (CurriculumConfig, CurriculumStage, MaskStrategyConfig, check_curriculum_reaches,
                       validate_curriculum)
from ..models.config import GeneratorConfig, MarDiniConfig, MotionConfig, PlannerConfig, validate_model_config

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # fp16 is named so that its refusal can explain itself
PARALLEL_MODES = ("ddp", "fsdp")
COMPILE_SCOPES = ("blocks", "networks")  # train.compile_scope (parallel.apply_compile)
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "muon")
TRACKERS = ("wandb", "tensorboard")
WANDB_MODES = ("auto", "online", "offline", "disabled")
AUTOENCODERS = ("identity", "kl", "kl_video")
DATA_SOURCES = ("synthetic", "video", "cache")
LOWRES_MODES = ("latents", "pixels")


@dataclass
class AutoencoderConfig:
    name: str = "identity"  # identity: pixels patched into latents, no weights needed
    patch_size: int = 2  # identity: pixels per latent cell side (latent channels = 3 * patch_size**2)
    scale: float = 1.0  # identity: latents = (patched pixels - shift) * scale
    shift: float = 0.0  # identity: subtracted before scaling
    pretrained: str = ""  # kl / kl_video: local folder of a diffusers VAE or pipeline (runs record it absolute)
    subfolder: str = ""  # kl / kl_video: folder inside `pretrained` holding the VAE, e.g. "vae"
    vae_class: str = ""  # kl / kl_video: diffusers class ("" = AutoencoderKL / AutoencoderKLCogVideoX)
    scaling_factor: Optional[float] = None  # kl / kl_video: override the VAE config's scaling_factor (null = use it)
    shift_factor: Optional[float] = None  # kl / kl_video: override the VAE config's shift_factor (null = use it)
    sample_posterior: bool = False  # kl / kl_video: sample the latent posterior instead of taking its mean
    frames_per_chunk: int = 8  # kl: frames per VAE call (kl_video: videos per call; 0 = all): bounds memory
    dtype: str = "float32"  # kl / kl_video: VAE weight dtype: float32 | bfloat16 | float16


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (procedural, no download) | video (files, decoded) | cache (latents)
    synthetic: SyntheticVideoConfig = field(default_factory=SyntheticVideoConfig)  # source=synthetic: the dataset
    video: VideoDataConfig = field(default_factory=VideoDataConfig)  # source=video: files, clip size and sampling
    cache_dir: str = ""  # source=cache: folder written by scripts/cache_latents.py
    val_cache_dir: str = ""  # source=cache: a cache of validation clips ("" = hold out data.video.val_fraction)
    lowres_mode: str = "latents"  # planner input: pooled hi-res latents (latents) or encoded smaller pixels; in exports
    prefetch_factor: int = 2  # batches each DataLoader worker loads ahead (with num_workers > 0)
    timeout: float = 600.0  # seconds a batch may take from the workers; then the run stops, naming its files (0: none)
    fps: int = 8  # frame rate the clips represent (written into exports and sample videos)
    val_seed: int = 1_000_003  # validation clips' seed (synthetic: its own stream; video: starts in held-out files)
    num_workers: int = 0  # DataLoader worker processes (0 = load in the main process; at most the usable CPUs)
    pin_memory: bool = True  # pin host memory when training on a GPU


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps to train
    batch_size: int = 8  # micro-batch per device
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * world size)
    noise_draws: int = 1  # noise levels and noises per clip and step: planner once per clip, generator per draw
    lr: float = 3e-4  # peak learning rate (AdamW; Muon steps are scaled to match AdamW's update size)
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' weight matrices, AdamW for the rest; not with fsdp)
    muon_momentum: float = 0.95  # optimizer=muon: Nesterov momentum of the Muon groups
    weight_decay: float = 0.01  # AdamW decay, applied to matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 50  # linear warm-up steps
    lr_schedule: str = "cosine"  # cosine | constant (after warm-up)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr (unused by lr_schedule=constant)
    grad_clip: float = 1.0  # max global grad norm (0 disables clipping)
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16 (fp16 is refused: no loss scaling)
    parallel: str = "ddp"  # ddp (replicated weights) | fsdp (FSDP2 per block; sharded checkpoints)
    activation_checkpointing: bool = False  # recompute each transformer block in backward (less memory)
    compile: bool = False  # torch.compile each transformer block (one generator graph for every mask)
    compile_motion: bool = True  # with compile: also torch.compile the motion estimate (matcher, learned features)
    compile_scope: str = "blocks"  # with compile: blocks (each transformer block) | networks (the planner and the
    # generator whole: fewer host launches; not with fsdp or activation_checkpointing)
    ema_decay: float = 0.999  # EMA of the weights (the exported model); warm-up min(decay, (1+s)/(ema_warmup+s))
    ema_warmup: float = 10.0  # EMA warm-up: below ema_decay (until step 8991 at 0.999) it averages the last ~1/(w-1)
    log_every: int = 10  # steps between metric logs
    sample_every: int = 0  # steps between validation videos (0 = only at the end)
    num_sample_videos: int = 2  # validation clips per task (interpolation, image-to-video)
    sample_steps: int = 0  # sampler steps for validation videos (0 = diffusion.num_inference_steps)
    eval_every: int = 0  # steps between PSNR/SSIM/FVD on a fixed validation set (0 = never)
    eval_num_videos: int = 16  # clips in that validation set (FVD of few clips: compare across steps only)
    eval_weights_dir: str = ""  # folder with the I3D weights ("" = $MARDINI_WEIGHTS or ../shared/weights); no file: no FVD
    checkpoint_every: int = 500  # steps between resumable checkpoints (a final one is always written)
    keep_last: int = 2  # checkpoints kept (older ones deleted)
    resume: str = ""  # "" = fresh run | auto = newest complete checkpoint in the run dir | a checkpoint path
    init_from: str = ""  # export or checkpoint folder: load weights only (fine-tuning), fresh optimizer
    freeze_planner: bool = False  # fine-tuning: keep the planner fixed
    freeze_generator: bool = False  # fine-tuning: keep the generator fixed
    max_nonfinite: int = 5  # consecutive non-finite losses that stop the run (after a checkpoint)
    trackers: List[str] = field(default_factory=lambda: ["wandb", "tensorboard"])  # wandb | tensorboard (any)
    wandb_project: str = "mardini"  # wandb project name
    wandb_mode: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled
    output_dir: str = ""  # run folder ("" = Hydra's run dir outputs/<experiment>/<run_name>)
    cpu: bool = False  # train on CPU even if a GPU is present
    progress: bool = True  # tqdm progress bar
    progress_log_s: float = 60.0  # with the bar off: a progress line in the log at most this often, s (0 = none)
    deterministic: bool = False  # bit-identical reruns of a seed on the GPU (deterministic kernels only; slower)


@dataclass
class Config:
    experiment: str = "tiny_synthetic"  # name of the preset; names the run folder
    run_name: str = "default"  # run folder name under outputs/<experiment>/ (same name + resume=auto continues)
    seed: int = 0  # drives init, masks, noise and data order
    model: MarDiniConfig = field(default_factory=MarDiniConfig)  # see mardini/models/config.py
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # see mardini/diffusion/config.py
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)  # see mardini/masking.py
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # latent space
    data: DataConfig = field(default_factory=DataConfig)  # training data
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, checkpoints, logging


# Field annotations are strings (from __future__ import annotations): map them back to the nested schemas.
_FIELD_TYPES = {cls.__name__: cls for cls in (MarDiniConfig, PlannerConfig, GeneratorConfig, MotionConfig,
                                              DiffusionConfig, CurriculumConfig, CurriculumStage, AutoencoderConfig,
                                              DataConfig, SyntheticVideoConfig, VideoDataConfig, TrainConfig)}
_LIST_ITEM_TYPES = {"List[CurriculumStage]": CurriculumStage, "List[MaskStrategyConfig]": MaskStrategyConfig}


def register_configs() -> None:
    """Register the schema with Hydra (imported lazily so the library itself never needs Hydra)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="mardini_schema", node=Config)


def check_known_keys(cfg, schema=Config, path: str = "") -> None:
    """Every key must be a schema field. Hydra's `+key=value` appends bypass the structured-config check, so
    this walks the tree itself and names the first unknown key."""
    if is_dataclass(cfg):
        return
    known = {f.name: f for f in fields(schema)}
    for key in cfg.keys():
        name = f"{path}{key}"
        if key not in known:
            raise ValueError(f"unknown config key {name!r}; {path.rstrip('.') or 'the top level'} has "
                             f"{sorted(known)}")
        sub, item_type = _schema_of(known[key].type)
        value = cfg[key]
        if sub is not None and hasattr(value, "keys"):
            check_known_keys(value, sub, name + ".")
        elif item_type is not None and value is not None:
            for i, item in enumerate(value):
                check_known_keys(item, item_type, f"{name}[{i}].")


def _schema_of(annotation) -> tuple[type | None, type | None]:
    """(nested dataclass, list item dataclass) of a field annotation, real or a string."""
    if isinstance(annotation, str):
        return _FIELD_TYPES.get(annotation), _LIST_ITEM_TYPES.get(annotation)
    if is_dataclass(annotation):
        return annotation, None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, typing.List) and args and is_dataclass(args[0]):
        return None, args[0]
    return None, None


def latent_space(ae) -> dict:
    """{"latent_channels", "spatial_compression", "temporal_compression"} of the configured autoencoder (reads a
    VAE's config.json, not its weights)."""
    if ae.name == "identity":
        return {"latent_channels": 3 * ae.patch_size**2, "spatial_compression": ae.patch_size,
                "temporal_compression": 1}
    from ..autoencoders.kl import latent_properties, read_vae_config

    if not ae.pretrained:
        raise ValueError(f"autoencoder.pretrained must name a local folder with a diffusers VAE for "
                         f"autoencoder.name={ae.name}")
    default_class = "AutoencoderKLCogVideoX" if ae.name == "kl_video" else "AutoencoderKL"
    try:
        config = read_vae_config(ae.pretrained, ae.subfolder, ae.vae_class or default_class)
    except Exception as e:
        raise ValueError(f"autoencoder.pretrained={ae.pretrained} (subfolder={ae.subfolder!r}): cannot read the VAE "
                         f"config: {e}") from e
    return latent_properties(config)


def clip_config(cfg):
    """(config key, node) of the clips the run trains on; None for a latent cache (its own metadata rules)."""
    return {"synthetic": ("data.synthetic", cfg.data.synthetic), "video": ("data.video", cfg.data.video),
            "cache": None}[cfg.data.source]


def preset_required_keys(experiment: str) -> list[str]:
    """The dotted keys an experiment preset marks ``???`` (a value the user must give, e.g. the weights a fine-tuning
    preset starts from): a structured config merges such a key as its schema default, so they are checked here."""
    from ..cli import CONFIG_DIR

    path = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
    if not experiment or not path.is_file():
        return []
    keys = []

    def walk(node, prefix: str) -> None:
        for key in node:
            name = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                keys.append(name)
            elif OmegaConf.is_dict(node[key]):
                walk(node[key], name + ".")

    walk(OmegaConf.load(path), "")
    return [k for k in keys if k != "defaults"]


def check_finite_numbers(cfg) -> None:
    """Every float of the config is finite: `train.lr=inf` or a NaN scale passes every range check (`inf > 0`) and
    would train non-finite weights. No key takes an infinite value on purpose."""

    def walk(node, prefix: str):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}[{i}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ValueError(f"{prefix} must be a finite number, got {node}")

    walk(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dataclasses.asdict(cfg), "")


def compile_scope_conflict(scope: str, parallel: str, activation_checkpointing: bool) -> str:
    """Why torch.compile cannot run at this scope with these wrappers ("" if it can): FSDP2 and activation
    checkpointing wrap each block, which compile_scope=networks would compile inside one graph."""
    if scope == "networks" and (parallel == "fsdp" or activation_checkpointing):
        return ("compiles whole networks and cannot be combined with train.parallel=fsdp or "
                "train.activation_checkpointing=true (both wrap each block): use train.compile_scope=blocks")
    return ""


def validate_config(cfg) -> None:
    """Check values and cross-field consistency; raise ValueError naming the key. Accepts a DictConfig or Config."""

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ValueError(f"{key} {msg}")

    check_known_keys(cfg)
    check_finite_numbers(cfg)
    experiment = getattr(cfg, "experiment", "")
    for key in preset_required_keys(experiment):  # merged over the schema's default, `???` keeps the default
        need(OmegaConf.select(cfg, key) not in ("", None), key,
             f"is required by experiment={experiment} (marked ??? in configs/experiment/{experiment}.yaml)")
    t = cfg.train
    need(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    need(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    need(t.noise_draws >= 1, "train.noise_draws", f"must be >= 1, got {t.noise_draws}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(0 <= t.beta1 < 1, "train.beta1", f"must be in [0, 1), got {t.beta1}")
    need(0 <= t.beta2 < 1, "train.beta2", f"must be in [0, 1), got {t.beta2}")
    need(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
    need(t.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    need(0 <= t.muon_momentum < 1, "train.muon_momentum", f"must be in [0, 1), got {t.muon_momentum}")
    need(not (t.optimizer == "muon" and t.parallel == "fsdp"), "train.optimizer=muon",
         "needs whole weight matrices and cannot run with train.parallel=fsdp (sharded weights): use "
         "train.parallel=ddp or train.optimizer=adamw")
    need(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    need(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"must be one of {LR_SCHEDULES}, got {t.lr_schedule!r}")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    need(t.mixed_precision in MIXED_PRECISION, "train.mixed_precision",
         f"must be one of {MIXED_PRECISION}, got {t.mixed_precision!r}")
    # fp16 would need loss scaling carried through gradient clipping and skipped (non-finite) steps; refused rather
    # than half-supported.
    need(t.mixed_precision != "fp16", "train.mixed_precision=fp16",
         "is not supported (the trainer does no loss scaling): use train.mixed_precision=bf16 (Ampere or newer "
         "GPUs) or no")
    need(t.parallel in PARALLEL_MODES, "train.parallel", f"must be one of {PARALLEL_MODES}, got {t.parallel!r}")
    need(t.compile_scope in COMPILE_SCOPES, "train.compile_scope",
         f"must be one of {COMPILE_SCOPES}, got {t.compile_scope!r}")
    if t.compile:
        conflict = compile_scope_conflict(t.compile_scope, t.parallel, t.activation_checkpointing)
        need(not conflict, "train.compile_scope=networks", conflict)
    need(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    need(t.ema_warmup > 1, "train.ema_warmup", f"must be > 1 (decay (1+s)/(w+s) below 1), got {t.ema_warmup}")
    for key in ("log_every", "checkpoint_every", "keep_last", "max_nonfinite", "num_sample_videos", "eval_num_videos"):
        need(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    need(t.progress_log_s >= 0, "train.progress_log_s", f"must be >= 0, got {t.progress_log_s}")
    for key in ("sample_every", "sample_steps", "eval_every"):
        need(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if cfg.diffusion.formulation == "ddpm":  # checked here, not when the end-of-run samples are drawn
        need(t.sample_steps <= cfg.diffusion.num_train_timesteps, "train.sample_steps",
             f"({t.sample_steps}) must be <= diffusion.num_train_timesteps ({cfg.diffusion.num_train_timesteps}) "
             f"for ddpm")
    for tracker in t.trackers:
        need(tracker in TRACKERS, "train.trackers", f"entries must be in {TRACKERS}, got {tracker!r}")
    need(t.wandb_mode in WANDB_MODES, "train.wandb_mode", f"must be one of {WANDB_MODES}, got {t.wandb_mode!r}")
    need(not (t.freeze_planner and t.freeze_generator), "train.freeze_planner",
         "and train.freeze_generator are both set: nothing would train")
    need(not (t.resume not in ("", "auto") and t.init_from), "train.init_from",
         "cannot be combined with train.resume=<checkpoint> (that restores everything; init_from loads weights "
         "only); with train.resume=auto a run continues from its own last checkpoint and starts from init_from "
         "when it has none")

    ae, d = cfg.autoencoder, cfg.data
    need(ae.name in AUTOENCODERS, "autoencoder.name", f"must be one of {AUTOENCODERS}, got {ae.name!r}")
    need(ae.patch_size >= 1, "autoencoder.patch_size", f"must be >= 1, got {ae.patch_size}")
    need(ae.scale > 0, "autoencoder.scale", f"must be > 0, got {ae.scale}")
    need(ae.frames_per_chunk >= 0, "autoencoder.frames_per_chunk", f"must be >= 0, got {ae.frames_per_chunk}")
    need(ae.dtype in ("float32", "bfloat16", "float16"), "autoencoder.dtype", f"got {ae.dtype!r}")
    need(d.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}, got {d.source!r}")
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    need(d.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {d.prefetch_factor}")
    need(d.timeout >= 0, "data.timeout", f"must be >= 0 seconds (0 = wait forever), got {d.timeout}")
    need(d.lowres_mode in LOWRES_MODES, "data.lowres_mode", f"must be one of {LOWRES_MODES}, got {d.lowres_mode!r}")
    if d.source == "video":
        need(bool(d.video.root), "data.video.root", "must name a folder of videos or a manifest for data.source=video")
        read_video_config(d.video)
    if d.source == "cache":
        need(bool(d.cache_dir), "data.cache_dir", "must name a folder made by scripts/cache_latents.py")
        need(not d.val_cache_dir or os.path.realpath(os.path.expanduser(d.val_cache_dir)) !=
             os.path.realpath(os.path.expanduser(d.cache_dir)), "data.val_cache_dir",
             f"({d.val_cache_dir}) must be another folder than data.cache_dir ({d.cache_dir}; symbolic links "
             f"resolved): validation clips are never trained on")
        read_video_config(d.video)  # data.video.val_fraction rules the hold-out when data.val_cache_dir is empty

    validate_model_config(cfg.model)
    validate_diffusion_config(cfg.diffusion)
    validate_curriculum(cfg.curriculum)
    check_curriculum_reaches(cfg.curriculum, t.max_steps)

    m, space = cfg.model, latent_space(ae)
    need(m.latent_channels == space["latent_channels"], "model.latent_channels",
         f"({m.latent_channels}) must equal the autoencoder's latent channels ({space['latent_channels']} for "
         f"autoencoder.name={ae.name}" + (f" with patch_size={ae.patch_size})" if ae.name == "identity" else ")"))
    clip = clip_config(cfg)
    if clip is None:  # a latent cache: the trainer checks its clips' size with check_clip_shape once it is read
        return
    key, c = clip
    check_clip_shape(lambda field: f"{key}.{field}", dict(num_frames=c.num_frames, height=c.height, width=c.width),
                     m, space)


def check_clip_shape(label, clip: dict, m, space: dict) -> None:
    """The clip size (num_frames, height, width) fits the model and the autoencoder; ValueError naming
    label(field) otherwise (a config key, or the latent cache the clips come from)."""
    def need(ok: bool, field: str, msg: str):
        if not ok:
            raise ValueError(f"{label(field)} {msg}")

    s, r, n = space["spatial_compression"], space["temporal_compression"], clip["num_frames"]
    need(n >= 2, "num_frames", f"must be >= 2, got {n}")
    need((n - 1) % r == 0, "num_frames", f"({n}) must be 1 + a multiple of the VAE's temporal compression {r}")
    latent_frames = (n - 1) // r + 1 if r > 1 else n
    need(latent_frames <= m.max_frames, "num_frames",
         f"({n}, {latent_frames} latent frames) exceeds model.max_frames ({m.max_frames})")
    for side in ("height", "width"):
        pixels = clip[side]
        cell = s * m.lowres_factor * max(m.planner.patch_size, 1)
        need(pixels % (s * m.generator.patch_size) == 0 and pixels % cell == 0, side,
             f"({pixels}) must be divisible by the autoencoder's compression * generator.patch_size "
             f"({s * m.generator.patch_size}) and by compression * model.lowres_factor * planner.patch_size ({cell})")
