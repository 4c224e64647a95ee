"""Adaptation methods, registered by name. This package is the registry: it imports every method
module (each registers itself with ``base.register``) and makes instances with ``get_method``."""

from __future__ import annotations

from typing import Any, Mapping

from deltawise.adapt.methods import (  # noqa: F401
    corda, dora, fourierft, full, hft, kasa, lift, lora, lora_fa, loldu, miss, osf, pissa, randlora, sorsa,
)
from deltawise.adapt.methods.base import REGISTRY, Method, MethodError

__all__ = ["REGISTRY", "Method", "MethodError", "get_method"]


def get_method(name: str, params: Mapping[str, Any] | None = None) -> Method:
    """A new instance of the method ``name`` with ``params`` validated against its declared ``params``
    (unknown names and out-of-range values raise MethodError) and the defaults filled in."""
    if name not in REGISTRY:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](params)
