"""Kernel configurations: the value types, the default heuristic, and (later) tuned tables."""

from moekit.tuning.config import ExpertsConfig, GemmConfig
from moekit.tuning.heuristic import default_config

__all__ = ["ExpertsConfig", "GemmConfig", "default_config"]
