"""The exported model folder, shared by training (writes it), inference and fine-tuning (read it).

Layout (diffusers-style: configs beside safetensors weights)::

    config.json                      format + version, model / diffusion / autoencoder configs, clip size, fps,
                                     lowres_mode (how the planner's input was made: inference must do the same),
                                     data (the training data config: where its held-out clips come from)
    model.safetensors                EMA weights (what inference uses by default)
    raw_model.safetensors            the raw (non-averaged) weights, optional
    scheduler/scheduler_config.json  the diffusers scheduler used for sampling, for reference

A training checkpoint folder (``step_000500/``) can stand in for an export: its ``config.yaml`` holds the same
configs and ``ema.safetensors`` / ``model.safetensors`` the EMA / raw weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import follow_umask

log = logging.getLogger(__name__)

EXPORT_FORMAT = "mardini"
EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
EMA_WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "raw_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
WEIGHT_CHOICES = ("ema", "raw")
SHARDED = "sharded"  # inside an FSDP training checkpoint: the torch.distributed.checkpoint folder


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_export(directory: str | Path, ema_state: dict[str, torch.Tensor], config: dict,
                raw_state: dict[str, torch.Tensor] | None = None, scheduler_config: dict | None = None) -> Path:
    """Write an export atomically: everything goes to a temporary folder that is renamed when complete.
    `config` holds at least "model", "diffusion" and "autoencoder"."""
    from . import __version__

    for key in ("model", "diffusion", "autoencoder"):
        if key not in config:
            raise ValueError(f"export config needs a {key!r} entry")
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    header = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "mardini_version": __version__}
    (tmp / CONFIG_FILE).write_text(json.dumps({**header, **config}, indent=2))
    save_file(_cpu(ema_state), str(tmp / EMA_WEIGHTS))
    if raw_state is not None:
        save_file(_cpu(raw_state), str(tmp / RAW_WEIGHTS))
    if scheduler_config is not None:
        (tmp / "scheduler").mkdir()
        (tmp / SCHEDULER_CONFIG).write_text(json.dumps(scheduler_config, indent=2, default=str))
    follow_umask(*tmp.glob("*.safetensors"))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def is_checkpoint(path: Path) -> bool:
    return (path / "COMPLETE").exists() and (path / "config.yaml").exists()


def read_config(path: str | Path) -> dict:
    """The configs of an export (config.json) or of a training checkpoint (config.yaml); clear errors otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (expected a mardini export or checkpoint)")
    if is_checkpoint(path):
        from omegaconf import OmegaConf

        run = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        data = run["data"]
        if data["source"] == "cache":
            meta = Path(data["cache_dir"]) / "cache.json"
            if not meta.is_file():  # else only "[Errno 2] ... cache.json", and nothing on why it was read
                raise FileNotFoundError(f"{path} was trained from the latent cache data.cache_dir={data['cache_dir']}, "
                                        f"which is gone: the checkpoint's clip size is read from its cache.json; put "
                                        f"the cache back there, or use the run's export (it records the clip size)")
            clip = json.loads(meta.read_text())["dataset"]["config"]
        else:
            clip = data[data["source"]]  # data.synthetic or data.video
        return {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "model": run["model"],
                "diffusion": run["diffusion"], "autoencoder": run["autoencoder"], "num_frames": clip["num_frames"],
                "height": clip["height"], "width": clip["width"], "fps": data["fps"],
                "lowres_mode": data.get("lowres_mode", "latents"), "data": data}
    for name in (CONFIG_FILE, EMA_WEIGHTS):
        if not (path / name).exists():
            hint = ""
            if (path / "export" / CONFIG_FILE).exists():
                hint = f" (a run folder? its export is {path / 'export'})"
            elif (path / "config.yaml").exists() and (path / "checkpoints").is_dir():
                hint = f" (a run folder without an export: give one of {path / 'checkpoints'}/step_*)"
            elif any(is_checkpoint(p) for p in path.glob("step_*")):  # a run's checkpoints/ folder
                newest = max(p for p in path.glob("step_*") if is_checkpoint(p))
                hint = f" (a folder of checkpoints: give one of them, e.g. the newest, {newest})"
            elif (path / "config.yaml").exists():
                hint = (" (a training checkpoint without its COMPLETE marker: its save was interrupted; use an "
                        "earlier one)")
            raise FileNotFoundError(f"{path} is not a mardini export: {name} is missing{hint}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON ({e})") from None
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a mardini export (format={config.get('format')!r})")
    if config.get("format_version") != EXPORT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE} has format_version={config.get('format_version')!r}; this version of "
                         f"mardini reads format_version={EXPORT_VERSION}")
    for key in ("model", "diffusion", "autoencoder"):
        if key not in config:
            raise ValueError(f"{path / CONFIG_FILE} lacks the {key!r} entry")
    return config


def read_weights(path: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """EMA or raw weights of an export or a training checkpoint."""
    if which not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {which!r}")
    path = Path(path)
    if is_checkpoint(path) and (path / SHARDED / ".metadata").exists():  # an FSDP checkpoint
        from omegaconf import OmegaConf

        from .models import MarDini

        model_cfg = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)["model"]
        with torch.device("meta"):  # the model's config only: the run's data (a latent cache) may be gone
            like = MarDini(model_cfg).state_dict()
        return read_sharded_weights(path, "ema" if which == "ema" else "model", like)
    if is_checkpoint(path):
        name = "ema.safetensors" if which == "ema" else "model.safetensors"
    else:
        read_config(path)
        name = EMA_WEIGHTS if which == "ema" else RAW_WEIGHTS
    if not (path / name).exists():
        raise FileNotFoundError(f"{path / name} is missing ({which} weights requested)")
    try:
        return load_file(str(path / name))
    except Exception as e:  # safetensors' SafetensorError: a truncated or foreign file
        raise ValueError(f"{path / name} cannot be read as safetensors ({e}): an incomplete copy?") from None


def read_sharded_weights(path: str | Path, key: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of one entry ("ema" or "model") of a sharded checkpoint, in one process;
    `like` gives names and shapes (e.g. a meta-device model's state_dict)."""
    import torch.distributed.checkpoint as dcp

    state = {key: {k: torch.empty_like(v, device="cpu") for k, v in like.items()}}
    dcp.load(state, checkpoint_id=str(Path(path) / SHARDED), no_dist=True)
    return state[key]


def _first_few(names: list[str], shown: int = 4) -> str:
    """A few names and how many more: a size mismatch names every tensor of the model, one screen is enough."""
    more = f"; ... and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} tensor(s): " + "; ".join(names[:shown]) + more


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                 optional: tuple[str, ...] = ()) -> None:
    """Strict load that names every missing, unexpected or mis-shaped tensor. Tensors whose names start with one of
    `optional` may be absent on either side: a missing one keeps the model's own initialisation, an unexpected one
    is dropped (training-only heads when fine-tuning under another recipe)."""
    own = model.state_dict()
    if optional:
        state = {k: v for k, v in state.items() if k in own or not k.startswith(optional)}
        state.update({k: v for k, v in own.items() if k not in state and k.startswith(optional)})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"weights from {source} do not fit the model:"]
        for what, names in (("shape mismatch", mismatched), ("missing in checkpoint", missing),
                            ("unexpected in checkpoint", unexpected)):
            if names:
                lines.append(f"  {what}: {_first_few(names)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state)


def load_model(path: str | Path, which: str = "ema", device="cpu", attn_backend: str | None = None,
               dtype: torch.dtype | None = None):
    """(MarDini model in eval mode, config dict) from an export or checkpoint folder. attn_backend: the attention
    backend to compute with (sdpa, xformers, fa4; the weights are the same under each); None keeps the one the
    model was trained with where it runs on `device` at `dtype` (the dtype the model will compute in, if known),
    else takes sdpa (a run trained with fa4 on a GPU is sampled on a CPU, or in fp32), saying so."""
    from .models import MarDini
    from .models.layers import backend_cannot_run

    config = read_config(path)
    trained = config["model"].get("attn_backend", "sdpa")
    reason = backend_cannot_run(trained, device, dtype) if attn_backend is None else None
    if reason is not None:
        log.warning("%s: trained with attention backend %r, which cannot compute here (%s): computing with sdpa "
                    "(the same attention)", path, trained, reason)
        attn_backend = "sdpa"
    if attn_backend is not None:
        config["model"] = {**config["model"], "attn_backend": attn_backend}
    model = MarDini(config["model"])
    load_weights(model, read_weights(path, which), source=str(path))
    return model.to(device).eval(), config
