"""Sparse and masked deltas: a bit-packed keep-mask over the tensor plus values.

- ``SparseDelta`` stores only the kept values (in row-major order of the mask): a pruned
  task vector (top-k by magnitude, LIFT/HFT-style sparse updates).
- ``MaskedDelta`` pairs a mask with a *dense* vector it selects from: one task of a TALL-mask
  file, ``m_t ⊙ τ_MTL`` (the dense vector is shared by all tasks, so it is not stored here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deltawise.delta.base import TensorDelta, numel_of, register_kind
from deltawise.delta.bits import pack_bits, unpack_bits


@register_kind
@dataclass
class SparseDelta(TensorDelta):
    shape: tuple[int, ...]
    mask_bits: torch.Tensor  # uint8, packed
    values: torch.Tensor  # 1-D, one per kept entry
    kind = "sparse"

    @classmethod
    def from_dense(cls, delta: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None) -> "SparseDelta":
        values = delta[mask].to(dtype or delta.dtype)
        return cls(tuple(delta.shape), pack_bits(mask), values.contiguous())

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.mask_bits, numel_of(self.shape), self.shape)

    def fields(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"mask": self.mask_bits, "values": self.values}, {}

    @classmethod
    def from_fields(cls, shape, tensors, meta) -> "SparseDelta":
        return cls(tuple(shape), tensors["mask"], tensors["values"])

    @property
    def natural_dtype(self) -> torch.dtype:
        return torch.float64 if self.values.dtype == torch.float64 else torch.float32

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=dtype)
        out[self.mask()] = self.values.to(dtype)
        return out


@dataclass
class MaskedDelta(TensorDelta):
    """``mask ⊙ values``; built in memory from a TALL file, never stored on its own."""

    values: torch.Tensor
    mask_bits: torch.Tensor
    kind = "masked"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.values.shape)

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.mask_bits, self.values.numel(), self.shape)

    def fields(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"values": self.values, "mask": self.mask_bits}, {}

    @classmethod
    def from_fields(cls, shape, tensors, meta) -> "MaskedDelta":
        return cls(tensors["values"].reshape(shape), tensors["mask"])

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.where(self.mask(), self.values.to(dtype), torch.zeros((), dtype=dtype))
