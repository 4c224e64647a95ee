"""The one NaN/inf screen for tensors read or written: merge, extract, apply and compress share it."""

from __future__ import annotations

import torch

from deltawise.errors import InputError

try:  # the C kernels (built at install time when a compiler is there): deltawise/_fused_finite.c
    from deltawise import _fused as _kernels
except ImportError:
    _kernels = None

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # as deltawise/_fused.c numbers them


def all_finite(x: torch.Tensor) -> bool:
    """True when no entry of ``x`` is NaN or infinite."""
    if not (x.is_floating_point() or x.is_complex()):
        return True
    if not x.numel():
        return True
    code = _CODES.get(x.dtype)
    # A contiguous CPU tensor of a common dtype: the C kernel tests the exponent bits of the
    # stored entries (all ones: NaN or inf), one read with no conversion, about 3x faster than
    # aminmax (a passthrough merge screens every byte it copies).
    if code is not None and _kernels is not None and x.device.type == "cpu" and x.is_contiguous():
        return _kernels.nonfinite(x.detach().reshape(-1).view(torch.uint8).numpy(), code) == 0
    # Otherwise: a NaN or inf anywhere makes the float32 sum non-finite, and one reduction is far
    # cheaper than isfinite(); the exact test only runs on the rare chunk whose sum overflowed or is
    # NaN. 16-bit floats: min and max in the stored dtype (aminmax propagates NaN into both, an inf
    # reaches one of them) need no float32 conversion, about 7x less CPU than the sum.
    if x.dtype in (torch.bfloat16, torch.float16):
        low, high = torch.aminmax(x)
        return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
    return bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())


def require_finite(x: torch.Tensor, label: str, name: str) -> None:
    """InputError naming the model ``label`` and the tensor ``name`` when ``x`` holds NaN or inf."""
    if not all_finite(x):
        raise InputError(f"model {label!r}: tensor {name!r} contains NaN or infinite values")
