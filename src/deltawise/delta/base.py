"""The contract every per-tensor delta type fulfils, and the registry of types by kind name.

A ``TensorDelta`` is the change of one weight tensor. It knows its shape, its size in bytes
(what it stores), how to materialise itself as a dense tensor, and how to add itself to a
base tensor. Storage is by *fields*: named tensors plus small JSON-able metadata, which the
delta folder (``store.py``) writes as ``"<tensor name>::<field>"`` safetensors entries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from deltawise.errors import InputError

KINDS: dict[str, type["TensorDelta"]] = {}


def register_kind(cls: type["TensorDelta"]) -> type["TensorDelta"]:
    KINDS[cls.kind] = cls
    return cls


def compute_dtype(*tensors: torch.Tensor | torch.dtype) -> torch.dtype:
    """float64 if any operand is float64, else float32: half-precision inputs are never summed
    in their own precision (docs/deltas.md, "Delta types"), and float64 deltas keep their exactness."""
    dtypes = [t if isinstance(t, torch.dtype) else t.dtype for t in tensors]
    return torch.float64 if torch.float64 in dtypes else torch.float32


class TensorDelta(ABC):
    kind: ClassVar[str]
    shape: tuple[int, ...]
    # True for types that store a tensor's new value rather than a difference (``full``): their
    # dense delta exists only against a base tensor (``relative_to``)
    replaces: ClassVar[bool] = False

    # ------------------------------------------------------------ what each type implements
    @abstractmethod
    def fields(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata) that fully describe the delta."""

    @classmethod
    @abstractmethod
    def from_fields(cls, shape: tuple[int, ...], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "TensorDelta":
        """Inverse of ``fields``."""

    @abstractmethod
    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta, shaped like the base tensor."""

    # ------------------------------------------------------------ shared behaviour
    def relative_to(self, base: torch.Tensor) -> "TensorDelta":
        """This delta as a difference from ``base``; the same object for every additive type."""
        return self

    @property
    def natural_dtype(self) -> torch.dtype:
        """The precision the delta should be materialised in (float64 only for float64 data)."""
        return compute_dtype(*self.fields()[0].values())

    def rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``start:stop`` of the dense delta (types override this when they can do better)."""
        full = self.materialize(dtype)
        return full[start:stop] if full.dim() else full

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this delta stores (its size on disk, without headers)."""
        return sum(t.numel() * t.element_size() for t in self.fields()[0].values())

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    def apply(self, base: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``base + scale * delta`` computed in float32 (float64 when either side is), returned
        in the base's dtype."""
        self.check_shape(tuple(base.shape), "base tensor")
        dtype = compute_dtype(base, self.natural_dtype)
        return (base.to(dtype) + scale * self.materialize(dtype)).to(base.dtype)

    def check_shape(self, shape: tuple[int, ...], what: str) -> None:
        if tuple(shape) != tuple(self.shape):
            raise InputError(f"{self.kind} delta has shape {list(self.shape)} but the {what} has shape {list(shape)}")


def numel_of(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
