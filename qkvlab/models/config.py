"""`ModelConfig` and the presets live in `qkvlab.arch` (importable without PyTorch); re-exported here."""

from qkvlab.arch import KINDS, MLPS, NORMS, POSITIONS, PRESETS, ModelConfig, preset

__all__ = ["KINDS", "MLPS", "NORMS", "POSITIONS", "PRESETS", "ModelConfig", "preset"]
