"""Architectures: the `ArchConfig` that describes a model, the model family it builds, and presets."""

from search_spaces.config import ROUTINGS, ArchConfig, MoEConfig
from search_spaces.model import ModelOutput, VisionMoE, build_model, count_params, describe
from search_spaces.presets import load_arch, preset_names

__all__ = [
    "ROUTINGS",
    "ArchConfig",
    "ModelOutput",
    "MoEConfig",
    "VisionMoE",
    "build_model",
    "count_params",
    "describe",
    "load_arch",
    "preset_names",
]
