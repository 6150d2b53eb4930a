"""The evaluation config group (a structured config the trainer / Hydra config can include as ``eval``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class EvalConfig:
    weights_dir: str | None = None  # I3D/LPIPS weights folder; None = $MARDINI_WEIGHTS or ../shared/weights/
    i3d_weights: str | None = None  # an explicit I3D file (overrides weights_dir)
    fvd_every: int = 0  # trainer: run periodic_fvd every this many steps (0 = never)
    fvd_num_videos: int = 16  # trainer: size of the fixed validation set for periodic_fvd
    fvd_batch_size: int = 4  # videos per generate / I3D call
    num_steps: int | None = None  # sampler steps for evaluation (None = the diffusion config's)
    tasks: tuple = ("interpolation", "i2v")  # periodic_fvd tasks

    @classmethod
    def from_any(cls, cfg: Any) -> "EvalConfig":
        """From a dataclass, dict or DictConfig; an unknown key fails naming it."""
        values = dict(cfg) if not hasattr(cfg, "__dataclass_fields__") else {f.name: getattr(cfg, f.name)
                                                                            for f in fields(cfg)}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"eval config: unknown key(s) {', '.join(unknown)}")
        out = cls(**values)
        for name in ("fvd_every", "fvd_num_videos", "fvd_batch_size"):
            value = getattr(out, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "fvd_every" else 1):
                raise ValueError(f"eval config: '{name}' has a bad value {value!r}")
        out.tasks = tuple(out.tasks)
        return out
