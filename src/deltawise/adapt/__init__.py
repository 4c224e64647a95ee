"""Adapters and sparse fine-tuning, the training loop, and training recipes (continual pre-training)."""

from deltawise.adapt.methods import MethodError, get_method
from deltawise.adapt.train import TrainConfig, TrainResult, run_train

__all__ = ["MethodError", "TrainConfig", "TrainResult", "get_method", "run_train"]
