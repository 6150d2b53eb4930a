"""Resumable checkpoints and model exports, written so that a crash never leaves a broken "latest".

A checkpoint is a folder ``checkpoints/step_000500/`` holding what Accelerate saves (model, optimizer, RNG state of
every rank, registered objects such as the LR scheduler), the EMA weights (``ema.safetensors``), the trainer state
(``trainer_state.json``: step, counters) and the resolved config. It is written under a temporary name and renamed
when complete; a ``COMPLETE`` marker is the last file written before the rename. Resuming picks the newest folder
that has the marker; leftovers of an interrupted write are ignored and removed.

Exports (the folder that inference and fine-tuning read) are defined in mardini/export.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..export import SHARDED
from ..files import follow_umask

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"  # Accelerate's name for the (first) model's weights (same as an export's)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = CHECKPOINT_RE.match(path.name)
        if m and path.is_dir() and (path / COMPLETE).exists():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse
        pass


def save_checkpoint(accelerator, checkpoint_dir: str | Path, step: int, write_state, trainer_state: dict,
                    config_yaml: str, keep_last: int) -> Path:
    """Collective: every rank calls it. `write_state(tmp_dir)` writes the model/optimizer/EMA/RNG part (also
    collective); this function makes the folder appear atomically and prunes old ones. Returns the final folder."""
    root = Path(checkpoint_dir)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    write_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        follow_umask(*tmp.rglob("*.safetensors"))  # Accelerate's weights and the EMA's
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        with open(tmp / COMPLETE, "w") as f:
            f.write(f"step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def write_accelerate_state(accelerator, ema_state: dict[str, torch.Tensor]):
    """DDP / single process: Accelerate's save_state (model.safetensors, optimizer, RNG of every rank, registered
    objects) plus ema.safetensors."""

    def write(tmp: Path) -> None:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / EMA_FILE))

    return write


def write_sharded_state(accelerator, model, optimizer, scheduler, ema_state: dict[str, torch.Tensor]):
    """FSDP: model, optimizer and EMA through torch.distributed.checkpoint (each rank writes its shards; loading
    reshards to any world size), the LR scheduler from rank 0 and every rank's RNG state."""

    def write(tmp: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, "ema": dict(ema_state)}, checkpoint_id=str(tmp / SHARDED))
        torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")

    return write
def prune_checkpoints(checkpoint_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of interrupted writes."""
    for _, path in list_checkpoints(checkpoint_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(checkpoint_dir).glob(".tmp-step_*"):
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed (not complete, a file missing or cut short), or None.
    Reads headers only, the same files on every rank, so all ranks reach the same answer before any loads."""
    from safetensors import safe_open

    path = Path(path)
    if not (path / COMPLETE).exists():
        return f"it is not a complete checkpoint (no {COMPLETE} marker)"
    sharded = is_sharded_checkpoint(path)
    required = [TRAINER_STATE, "scheduler.pt"] if sharded else [TRAINER_STATE, MODEL_FILE, EMA_FILE, "optimizer.bin"]
    for name in required:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((path / TRAINER_STATE).read_text())
    except ValueError as err:
        return f"{TRAINER_STATE} cannot be read ({err})"
    for name in [] if sharded else [MODEL_FILE, EMA_FILE]:
        try:
            with safe_open(str(path / name), "pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error type for a file cut short
            return f"{name} cannot be read ({err}; an interrupted copy?)"
    return None


def resumable_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that can be read (train.resume=auto): a damaged newest one (a copy cut short,
    a file deleted) is skipped with a warning, so that a requeued job goes on from the one before instead of
    failing at every restart. None if the folder holds no complete checkpoint; ValueError if none can be read."""
    found = list_checkpoints(checkpoint_dir)
    problems = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log.warning("train.resume=auto: skipped %s; resuming from %s", "; ".join(problems), path.name)
            return path
        problems.append(f"{path.name} ({problem})")
    if problems:
        raise ValueError(f"train.resume=auto: no checkpoint in {checkpoint_dir} can be read: {'; '.join(problems)}")
    return None


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDED / ".metadata").exists()


def load_checkpoint(accelerator, path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """DDP format: restore Accelerate's state from `path`; return (trainer_state, ema_state)."""
    path = _complete(path)
    if is_sharded_checkpoint(path):
        raise ValueError(f"{path} is a sharded (FSDP) checkpoint: resume it with train.parallel=fsdp")
    _say_missing_rng_states(accelerator, path, "random_states_{rank}.pkl")  # Accelerate's names
    accelerator.load_state(str(path))
    state = json.loads((path / TRAINER_STATE).read_text())
    return state, load_file(str(path / EMA_FILE))


def load_sharded_checkpoint(accelerator, path: str | Path, model, optimizer, scheduler,
                            ema_state: dict[str, torch.Tensor]) -> dict:
    """FSDP format: load model, optimizer and EMA (in place) resharded to the current world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = _complete(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is not a sharded checkpoint: resume it with train.parallel=ddp")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema_state}
    dcp.load(state, checkpoint_id=str(path / SHARDED))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    _say_missing_rng_states(accelerator, path, "rng_state_{rank}.pt")
    return json.loads((path / TRAINER_STATE).read_text())


def _say_missing_rng_states(accelerator, path: Path, name: str) -> None:
    """Warn once (main process) when the checkpoint lacks some ranks' RNG state (saved with fewer ranks, or a file
    lost): those ranks keep their own, which training does not depend on."""
    if not accelerator.is_main_process:
        return
    saved = sum((path / name.format(rank=rank)).exists() for rank in range(accelerator.num_processes))
    if saved < accelerator.num_processes:
        log.warning("%s holds the RNG state of %d of these %d ranks: the others keep their own (the per-sample "
                    "randomness is seeded by step and sample, so training draws the same)", path, saved,
                    accelerator.num_processes)


def read_checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a complete checkpoint (model, optimizer, EMA), flattened to dotted names, in one plain
    process (no process group; a sharded checkpoint is read whole whatever world size wrote it). For comparing
    checkpoints written by different world sizes: scripts/compare_checkpoints.py."""
    path = _complete(path)
    if is_sharded_checkpoint(path):
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
            nested = _load_state_dict_from_keys(checkpoint_id=str(path / SHARDED))
    else:
        nested = {"model": load_file(str(path / MODEL_FILE)), "ema": load_file(str(path / EMA_FILE))}
        if (path / "optimizer.bin").exists():
            nested["optim"] = torch.load(path / "optimizer.bin", map_location="cpu", weights_only=False)
    flat: dict[str, torch.Tensor] = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{prefix}.{i}")
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk(nested, "")
    return flat


def _complete(path: str | Path) -> Path:
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this rank's device only: a resume may see fewer GPUs than the save did
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: the state of every device the rank could see
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
