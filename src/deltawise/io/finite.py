"""The one NaN/inf screen for tensors read or written: merge, extract, apply and compress share it."""

from __future__ import annotations

import torch

from deltawise.errors import InputError


def all_finite(x: torch.Tensor) -> bool:
    """True when no entry of ``x`` is NaN or infinite."""
    # A NaN or inf anywhere makes the float32 sum non-finite, and one reduction is far cheaper
    # than isfinite(); the exact test only runs on the rare chunk whose sum overflowed or is NaN.
    if not (x.is_floating_point() or x.is_complex()):
        return True
    return bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())


def require_finite(x: torch.Tensor, label: str, name: str) -> None:
    """InputError naming the model ``label`` and the tensor ``name`` when ``x`` holds NaN or inf."""
    if not all_finite(x):
        raise InputError(f"model {label!r}: tensor {name!r} contains NaN or infinite values")
