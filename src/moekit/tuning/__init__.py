"""Kernel configurations: the value types, the default heuristic, tuned tables, the tuner."""

from moekit.tuning.config import ExpertsConfig, GemmConfig
from moekit.tuning.heuristic import default_config

__all__ = ["ExpertsConfig", "GemmConfig", "default_config"]
