"""Builders for the diffusers scheduler objects that the config names.

Kept in one place so that training (noise schedule) and sampling (inference steps) build them the same way.
diffusers is imported where a scheduler is built, not with this module: it costs about 2 s (it brings torch._dynamo
and scipy.stats), which every command would otherwise pay before it can even refuse a bad config.
"""

import numpy as np

from .config import DiffusionConfig

_DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "velocity": None}


def ddpm_noise_scheduler(cfg: DiffusionConfig):
    """The DDPM training schedule (betas, alphas_cumprod); used for add_noise / get_velocity."""
    from diffusers import DDPMScheduler

    return _ddpm_family(DDPMScheduler, cfg)


def build_scheduler(cfg: DiffusionConfig, num_inference_steps: int):
    """A fresh scheduler with set_timesteps already called (diffusers schedulers keep a step index)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.formulation == "rectified_flow":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.flow_shift)
        # Pass the sigmas explicitly: the default grid runs from 1 to 1/num_train_timesteps (and, with shift != 1,
        # shifts that end point twice), so its last step is a wasted model call from ~0.001 to 0. Equal steps from 1
        # down to 1/n, then the final step to 0, shifted once (as diffusers' Flux pipeline does).
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(sigmas=sigmas.tolist())
        return scheduler
    cls = DDIMScheduler if cfg.sampler == "ddim" else DDPMScheduler
    if num_inference_steps > cfg.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps ({num_inference_steps}) must be <= num_train_timesteps ({cfg.num_train_timesteps})"
        )
    scheduler = _ddpm_family(cls, cfg)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def _ddpm_family(cls, cfg: DiffusionConfig):
    kwargs = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=_DIFFUSERS_PREDICTION[cfg.prediction],
        # diffusers defaults to clip_sample=True (clamps the x0 estimate to [-1, 1]): wrong for VAE latents.
        clip_sample=False,
        # "trailing" starts at the last training timestep (N-1), the noisiest level the model was trained on;
        # the default "leading" starts below it (e.g. 960 of 1000 with 25 steps) from pure noise, a mismatch.
        timestep_spacing="trailing",
    )
    if cls.__name__ == "DDIMScheduler":
        kwargs["set_alpha_to_one"] = True  # the last DDIM step lands on clean data (alpha_bar = 1)
    return cls(**kwargs)
