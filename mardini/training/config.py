"""The run configuration: the schema behind the Hydra YAMLs in configs/.

Every field has a default and a trailing comment (docs/CONFIG.md is generated from them by
scripts/config_reference.py). Registered with Hydra's ConfigStore as ``mardini_schema`` so that an unknown key or a
wrong type fails at composition, naming the key; ``validate_config`` then checks values and cross-field
consistency before anything is built.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import List

from ..data.synthetic import SyntheticVideoConfig
from ..diffusion.config import DiffusionConfig, validate_diffusion_config
from ..masking import (CurriculumConfig, CurriculumStage, MaskStrategyConfig, check_curriculum_reaches,
                       validate_curriculum)
from ..models.config import GeneratorConfig, MarDiniConfig, PlannerConfig, validate_model_config

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
PARALLEL_MODES = ("ddp", "fsdp")
LR_SCHEDULES = ("cosine", "constant")
TRACKERS = ("wandb", "tensorboard")
WANDB_MODES = ("auto", "online", "offline", "disabled")
AUTOENCODERS = ("identity",)
DATA_SOURCES = ("synthetic",)


@dataclass
class AutoencoderConfig:
    name: str = "identity"  # identity: pixels patched into latents, no weights needed
    patch_size: int = 2  # identity: pixels per latent cell side (latent channels = 3 * patch_size**2)
    scale: float = 1.0  # latents = (patched pixels - shift) * scale
    shift: float = 0.0  # subtracted before scaling


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic: procedural moving shapes, no download
    synthetic: SyntheticVideoConfig = field(default_factory=SyntheticVideoConfig)  # the synthetic dataset
    fps: int = 8  # frame rate the clips represent (written into exports and sample videos)
    val_seed: int = 1_000_003  # seed of the validation clips (a stream disjoint from training)
    num_workers: int = 0  # DataLoader worker processes (0 = load in the main process)
    pin_memory: bool = True  # pin host memory when training on a GPU


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps to train
    batch_size: int = 8  # micro-batch per device
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * world size)
    lr: float = 3e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW decay, applied to matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 50  # linear warm-up steps
    lr_schedule: str = "cosine"  # cosine | constant (after warm-up)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm (0 disables clipping)
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16 | fp16
    parallel: str = "ddp"  # ddp (replicated weights) | fsdp (FSDP2 per block; sharded checkpoints)
    activation_checkpointing: bool = False  # recompute each transformer block in backward (less memory)
    compile: bool = False  # torch.compile each transformer block
    ema_decay: float = 0.999  # EMA of the weights (the exported model); warm-up min(decay, (1+s)/(10+s))
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
_FIELD_TYPES = {name: cls for cls in (MarDiniConfig, PlannerConfig, GeneratorConfig, DiffusionConfig, CurriculumConfig,
                                      CurriculumStage, AutoencoderConfig, DataConfig, SyntheticVideoConfig,
                                      TrainConfig) for name in (cls.__name__,)}
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


def latent_channels(ae: AutoencoderConfig) -> int:
    return 3 * ae.patch_size**2


def validate_config(cfg) -> None:
    """Check values and cross-field consistency; raise ValueError naming the key. Accepts a DictConfig or Config."""

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ValueError(f"{key} {msg}")

    check_known_keys(cfg)
    t = cfg.train
    need(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    need(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(0 <= t.beta1 < 1, "train.beta1", f"must be in [0, 1), got {t.beta1}")
    need(0 <= t.beta2 < 1, "train.beta2", f"must be in [0, 1), got {t.beta2}")
    need(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
    need(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    need(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"must be one of {LR_SCHEDULES}, got {t.lr_schedule!r}")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    need(t.mixed_precision in MIXED_PRECISION, "train.mixed_precision",
         f"must be one of {MIXED_PRECISION}, got {t.mixed_precision!r}")
    need(t.parallel in PARALLEL_MODES, "train.parallel", f"must be one of {PARALLEL_MODES}, got {t.parallel!r}")
    need(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    for key in ("log_every", "checkpoint_every", "keep_last", "max_nonfinite", "num_sample_videos", "eval_num_videos"):
        need(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("sample_every", "sample_steps", "eval_every"):
        need(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    for tracker in t.trackers:
        need(tracker in TRACKERS, "train.trackers", f"entries must be in {TRACKERS}, got {tracker!r}")
    need(t.wandb_mode in WANDB_MODES, "train.wandb_mode", f"must be one of {WANDB_MODES}, got {t.wandb_mode!r}")
    need(not (t.freeze_planner and t.freeze_generator), "train.freeze_planner",
         "and train.freeze_generator are both set: nothing would train")
    need(not (t.resume and t.init_from), "train.init_from",
         "cannot be combined with train.resume (resume restores everything; init_from loads weights only)")

    ae = cfg.autoencoder
    need(ae.name in AUTOENCODERS, "autoencoder.name", f"must be one of {AUTOENCODERS}, got {ae.name!r}")
    need(ae.patch_size >= 1, "autoencoder.patch_size", f"must be >= 1, got {ae.patch_size}")
    need(ae.scale > 0, "autoencoder.scale", f"must be > 0, got {ae.scale}")
    need(cfg.data.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}, got {cfg.data.source!r}")
    need(cfg.data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")

    validate_model_config(cfg.model)
    validate_diffusion_config(cfg.diffusion)
    validate_curriculum(cfg.curriculum)
    check_curriculum_reaches(cfg.curriculum, t.max_steps)

    m, syn = cfg.model, cfg.data.synthetic
    need(m.latent_channels == latent_channels(ae), "model.latent_channels",
         f"({m.latent_channels}) must equal the autoencoder's latent channels ({latent_channels(ae)} for "
         f"autoencoder.name={ae.name} with patch_size={ae.patch_size})")
    need(syn.num_frames <= m.max_frames, "data.synthetic.num_frames",
         f"({syn.num_frames}) exceeds model.max_frames ({m.max_frames})")
    need(syn.num_frames >= 2, "data.synthetic.num_frames", f"must be >= 2, got {syn.num_frames}")
    for side in ("height", "width"):
        pixels = getattr(syn, side)
        cell = ae.patch_size * m.lowres_factor * max(m.planner.patch_size, 1)
        need(pixels % (ae.patch_size * m.generator.patch_size) == 0 and pixels % cell == 0, f"data.synthetic.{side}",
             f"({pixels}) must be divisible by autoencoder.patch_size * generator.patch_size "
             f"({ae.patch_size * m.generator.patch_size}) and by autoencoder.patch_size * model.lowres_factor * "
             f"planner.patch_size ({cell})")
