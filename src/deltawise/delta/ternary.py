"""Ternary delta (ComPEFT): ``scale · sgn ⊙ mask``, one float per tensor plus bits.

Stored as a bit-packed keep-mask over the tensor and one sign bit per *kept* entry (1 = +),
so the size is ``numel/8 + k/8`` bytes plus a scalar, whatever the base dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deltawise.delta.base import TensorDelta, numel_of, register_kind
from deltawise.delta.bits import pack_bits, unpack_bits


@register_kind
@dataclass
class TernaryDelta(TensorDelta):
    shape: tuple[int, ...]
    mask_bits: torch.Tensor  # uint8, packed keep-mask over all entries
    sign_bits: torch.Tensor  # uint8, packed, one bit per kept entry in row-major order
    scale: float
    kind = "ternary"

    @classmethod
    def from_dense(cls, delta: torch.Tensor, mask: torch.Tensor, scale: float) -> "TernaryDelta":
        # zeros have no sign: they are dropped from the mask so that sgn(0) = 0, as torch.sign gives
        mask = mask & (delta != 0)
        return cls(tuple(delta.shape), pack_bits(mask), pack_bits(delta[mask] > 0), float(scale))

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.mask_bits, numel_of(self.shape), self.shape)

    def fields(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"mask": self.mask_bits, "signs": self.sign_bits}, {"scale": self.scale}

    @classmethod
    def from_fields(cls, shape, tensors, meta) -> "TernaryDelta":
        return cls(tuple(shape), tensors["mask"], tensors["signs"], float(meta["scale"]))

    @property
    def natural_dtype(self) -> torch.dtype:
        return torch.float32

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mask = self.mask()
        kept = int(mask.sum())
        positive = unpack_bits(self.sign_bits, kept)
        out = torch.zeros(self.shape, dtype=dtype)
        signs = torch.where(positive, 1.0, -1.0).to(dtype)
        out[mask] = self.scale * signs
        return out
