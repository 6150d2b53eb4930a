"""Inference: the pipeline, task helpers and plans for long videos."""

from .pipeline import MarDiniPipeline
from .planning import Window, check_plan, describe_plan, expansion_plan, interpolation_plan, long_video_plan

__all__ = ["MarDiniPipeline", "Window", "check_plan", "describe_plan", "expansion_plan", "interpolation_plan",
           "long_video_plan"]
