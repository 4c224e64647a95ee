"""Adaptation methods, registered by name (importing this package registers all of them)."""

from deltawise.adapt.methods import dora, fourierft, full, hft, kasa, lift, lora, lora_fa, loldu, miss, pissa, randlora, sorsa  # noqa: F401
from deltawise.adapt.methods.base import REGISTRY, Method, MethodError, get_method

__all__ = ["REGISTRY", "Method", "MethodError", "get_method"]
