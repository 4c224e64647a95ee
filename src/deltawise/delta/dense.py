"""Dense delta: the full difference tensor ``θ_ft − θ_base`` (a task vector for one tensor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deltawise.delta.base import TensorDelta, register_kind


@register_kind
@dataclass
class DenseDelta(TensorDelta):
    values: torch.Tensor
    kind = "dense"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.values.shape)

    def fields(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"values": self.values}, {}

    @classmethod
    def from_fields(cls, shape, tensors, meta) -> "DenseDelta":
        return cls(tensors["values"].reshape(shape))

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.values.to(dtype)

    def rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.values[start:stop] if self.values.dim() else self.values).to(dtype)
