"""Diffusion formulations (rectified flow, DDPM), the masked training loss and samplers over diffusers schedulers."""

from .config import DiffusionConfig, validate_diffusion_config
from .diffusion import Diffusion
from .schedulers import build_scheduler

__all__ = ["Diffusion", "DiffusionConfig", "build_scheduler", "validate_diffusion_config"]
