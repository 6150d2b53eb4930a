"""The diffusion configuration: formulation (noise path + target), training-time sampling and inference sampler.

A plain dataclass so that the models can be used without Hydra; it doubles as an OmegaConf structured config.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

# Allowed values. The keys of the two dicts below are the formulations.
FORMULATIONS = ("rectified_flow", "ddpm")
PREDICTIONS = {"rectified_flow": ("velocity", "sample"), "ddpm": ("epsilon", "v")}
SAMPLERS = {"rectified_flow": ("euler",), "ddpm": ("ddim", "ddpm")}
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class DiffusionConfig:
    formulation: str = "rectified_flow"  # rectified_flow | ddpm
    prediction: str = "sample"  # rectified_flow: sample (clean latents x0) | velocity (noise - x0); ddpm: epsilon | v
    timestep_sampling: str = "uniform"  # uniform | logit_normal (t ~ sigmoid(N(mean, std)); starves t near 1)
    logit_mean: float = 0.0  # logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # logit_normal: std of the normal before the sigmoid (> 0)
    num_train_timesteps: int = 1000  # scale of the timestep fed to the network; number of DDPM steps
    beta_schedule: str = "scaled_linear"  # ddpm only: linear | scaled_linear | squaredcos_cap_v2
    beta_start: float = 0.00085  # ddpm only: first beta (linear / scaled_linear)
    beta_end: float = 0.012  # ddpm only: last beta (linear / scaled_linear)
    sampler: str = "euler"  # rectified_flow: euler ; ddpm: ddim | ddpm
    num_inference_steps: int = 25  # default number of sampling steps
    flow_shift: float = 1.0  # rectified_flow: sampling time shift (diffusers'); mardini-sample --flow-shift overrides
    # > 0: the generator reads each noisy frame x_t = a x0 + s noise scaled to the linear least-squares estimate of x0
    # for data of this standard deviation, a d^2 / (a^2 d^2 + s^2) x_t: pure noise fades out as t -> 1 instead of being
    # passed through to the prediction; 0: x_t as it is (exports from before the option)
    input_data_std: float = 0.0
    # Training loss weight of a sample at noise level t: (t + loss_weight_offset)^loss_weight_power, divided by its mean
    # over uniform t so that the loss keeps its scale. 0: every t alike. < 0 weighs the low noise levels (the last
    # sampling steps) more: on the CPU job made like the small presets -1 sampled 1.0 dB better, as the job ships
    # 0.4 dB worse; on small_synthetic (one H100, 2 500 steps) the same as 0 (BENCHMARKS.md, "The loss's weight over
    # noise levels on the GPU")
    loss_weight_power: float = 0.0
    loss_weight_offset: float = 0.05  # > 0: keeps a negative power finite at t -> 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field, so a bad config fails at start-up rather than mid-run."""
        _check_types(self)
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"diffusion.formulation must be one of {FORMULATIONS}, got {self.formulation!r}")
        if self.prediction not in PREDICTIONS[self.formulation]:
            raise ValueError(
                f"diffusion.prediction={self.prediction!r} does not fit formulation={self.formulation!r}; "
                f"allowed: {PREDICTIONS[self.formulation]}"
            )
        if self.sampler not in SAMPLERS[self.formulation]:
            raise ValueError(
                f"diffusion.sampler={self.sampler!r} does not fit formulation={self.formulation!r}; "
                f"allowed: {SAMPLERS[self.formulation]}"
            )
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"diffusion.timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}"
            )
        if not self.logit_std > 0:
            raise ValueError(f"diffusion.logit_std must be > 0, got {self.logit_std}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"diffusion.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"diffusion.beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not 0 < self.beta_start < 1:
            raise ValueError(f"diffusion.beta_start must be in (0, 1), got {self.beta_start}")
        if not self.beta_start < self.beta_end < 1:
            raise ValueError(f"diffusion.beta_end must be in (beta_start, 1), got {self.beta_end}")
        if self.num_inference_steps < 1:
            raise ValueError(f"diffusion.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.formulation == "ddpm" and self.num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"diffusion.num_inference_steps ({self.num_inference_steps}) must be <= "
                f"num_train_timesteps ({self.num_train_timesteps}) for ddpm"
            )
        if not self.flow_shift > 0:
            raise ValueError(f"diffusion.flow_shift must be > 0, got {self.flow_shift}")
        if not self.input_data_std >= 0:
            raise ValueError(f"diffusion.input_data_std must be >= 0 (0: off), got {self.input_data_std}")
        if not math.isfinite(self.loss_weight_power):
            raise ValueError(f"diffusion.loss_weight_power must be finite (0: off), got {self.loss_weight_power}")
        if not self.loss_weight_offset > 0:
            raise ValueError(f"diffusion.loss_weight_offset must be > 0, got {self.loss_weight_offset}")


def _check_types(cfg: DiffusionConfig) -> None:
    """Catch e.g. a YAML string where a number belongs (plain dicts are not type-checked by OmegaConf)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "str":
            ok = isinstance(value, str)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:  # float: ints are fine
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"diffusion.{f.name} must be a {kind}, got {value!r}")


def validate_diffusion_config(cfg: Any) -> DiffusionConfig:
    """Check a DiffusionConfig, an OmegaConf DictConfig or a plain mapping; return a validated DiffusionConfig.

    Unknown keys are errors (a typo must not silently fall back to a default).
    """
    if isinstance(cfg, DiffusionConfig):
        cfg.validate()
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is optional for notebook use
        pass
    if not isinstance(cfg, Mapping):
        raise ValueError(f"diffusion config must be a DiffusionConfig, DictConfig or mapping, got {type(cfg).__name__}")
    known = {f.name for f in dataclasses.fields(DiffusionConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown diffusion config key(s): {', '.join(f'diffusion.{k}' for k in unknown)}")
    return DiffusionConfig(**cfg)


def with_sampling_options(trained: dict, sampler: str | None = None, flow_shift: float | None = None) -> dict:
    """An export's diffusion settings with the sampling-time choices a user may change at generation: the sampler
    and, for rectified flow, the time shift (> 1: more of the steps at high noise, < 1 at low noise). The network
    learned neither, so neither needs retraining; checked here so that every entry point refuses the same values."""
    out = dict(trained)
    if sampler is not None:
        out["sampler"] = sampler
    if flow_shift is not None:
        if out.get("formulation") != "rectified_flow":
            raise ValueError(f"the time shift applies to rectified_flow models; this one was trained as "
                             f"{out.get('formulation')}")
        out["flow_shift"] = float(flow_shift)
    DiffusionConfig(**out)  # the trained settings with these choices must still be a valid config
    return out

