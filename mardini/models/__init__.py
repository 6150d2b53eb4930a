"""MarDini networks: the planner (MAR), the generator (tiny DiT) and the joint model."""

from .config import (GeneratorConfig, MarDiniConfig, MotionConfig, PlannerConfig, MODEL_SIZES, as_model_config,
                     model_config)
from .generator import Generator
from .mardini import MarDini, lowres_from_hires
from .planner import Planner

__all__ = [
    "GeneratorConfig", "MarDiniConfig", "MotionConfig", "PlannerConfig", "MODEL_SIZES", "as_model_config",
    "model_config",
    "Generator", "MarDini", "Planner", "lowres_from_hires",
]
