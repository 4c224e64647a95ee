"""TALL-mask delta (Wang et al. 2024, arXiv 2405.07813): one multi-task vector ``τ_MTL`` and one bit-packed mask
per task; task ``t`` is ``m_t ⊙ τ_MTL``.

``select(t)`` gives that task's ``MaskedDelta``; ``materialize`` without a selection returns
the multi-task vector itself (task arithmetic with λ = 1 over all tasks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from deltawise.delta.base import TensorDelta, register_kind
from deltawise.delta.sparse import MaskedDelta


@register_kind
@dataclass
class TallDelta(TensorDelta):
    values: torch.Tensor  # τ_MTL, dense
    masks: list[torch.Tensor] = field(default_factory=list)  # packed, one per task in task order
    kind = "tall"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.values.shape)

    def select(self, task: int) -> MaskedDelta:
        return MaskedDelta(self.values, self.masks[task])

    def fields(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"values": self.values}
        tensors.update({f"mask.{i}": m for i, m in enumerate(self.masks)})
        return tensors, {"tasks": len(self.masks)}

    @classmethod
    def from_fields(cls, shape, tensors, meta) -> "TallDelta":
        masks = [tensors[f"mask.{i}"] for i in range(int(meta["tasks"]))]
        return cls(tensors["values"].reshape(shape), masks)

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.values.to(dtype)
