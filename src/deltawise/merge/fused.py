"""The fused CPU path of linear and task_arithmetic: stored inputs to stored output in one pass.

The C kernels (``deltawise/_fused.c``, built at install time when a C compiler is there) take
the raw bfloat16/float16/float32 bytes the engine has read and write the output dtype directly, with
the torch path's float32 arithmetic operation for operation, so the two give the same bits
(tests/test_fused.py). Without the extension, or for float64 inputs or a GPU,
the engine runs the method's torch code instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

try:
    from deltawise import _fused as _kernels
except ImportError:  # no compiler at install time: the torch path does the same work
    _kernels = None

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
if _kernels is not None and getattr(_kernels, "float16", 0):  # the compiler had _Float16
    DTYPE_CODES[torch.float16] = 2


@dataclass(frozen=True)
class FusedSpec:
    """What a method asks of the kernel for one tensor.

    linear:           cast(sum_k w_k x_k [/ divisor])
    task_arithmetic:  cast(b + scale * (sum_k w_k (x_k - b) [/ divisor]))
    sparse:           TIES, DARE, Breadcrumbs, DELLA, Consensus (``fused_sparse.py``), with the tensor's statistics
    Weights, divisor and scale are rounded to float32 by the kernel, as torch rounds scalars.
    """

    kind: Literal["linear", "task_arithmetic", "sparse"]
    weights: tuple[float, ...]
    divisor: Optional[float] = None
    scale: float = 1.0
    sparse: Optional[Any] = None  # kind "sparse": a fused_sparse.SparseSpec (run by fused_sparse.run)


def available() -> bool:
    return _kernels is not None


def describe() -> str:
    """Which copy of the kernels runs here ("avx2+fma", "baseline"), or "not built"."""
    return _kernels.path if _kernels is not None else "not built"


def supports(dtypes: list[torch.dtype]) -> bool:
    return all(d in DTYPE_CODES for d in dtypes)


def _raw(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor as a buffer the kernel can read or write."""
    return t.reshape(-1).view(torch.uint8).numpy()


def run(spec: FusedSpec, out: torch.Tensor, models: list[torch.Tensor], base: Optional[torch.Tensor] = None) -> int:
    """Fill ``out`` (contiguous, CPU) from ``models`` (and ``base``); returns how many entries
    of ``out`` are NaN or infinite (a result too large for ``out``'s dtype counts)."""
    if _kernels is None:
        raise RuntimeError("deltawise._fused is not built; reinstall deltawise with a C compiler present")
    numel = out.numel()
    for t in models + ([base] if base is not None else []):
        if t.numel() != numel or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("fused inputs must be contiguous CPU tensors with as many entries as the output")
    codes = [DTYPE_CODES[m.dtype] for m in models]
    if spec.kind == "linear":
        return _kernels.linear(_raw(out), DTYPE_CODES[out.dtype], [_raw(m) for m in models], codes,
                               list(spec.weights), spec.divisor)
    if base is None:
        raise ValueError("task_arithmetic needs the base tensor")
    return _kernels.task_arithmetic(_raw(out), DTYPE_CODES[out.dtype], _raw(base), DTYPE_CODES[base.dtype],
                                    [_raw(m) for m in models], codes, list(spec.weights), spec.divisor, float(spec.scale))
