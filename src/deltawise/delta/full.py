"""Full delta: a tensor's new value, stored whole and taken as is (not added).

Used for tensors a fine-tune creates or re-initialises rather than nudges: a new
classification head trained by ``deltawise train``. Against a base tensor of the same shape
its delta is ``value − base`` (in float64, so ``base + (value − base)`` gives back ``value``
exactly for float32 and narrower weights), which makes ``--scale`` and merging behave as for
any other delta; a tensor the base lacks is added to it as stored (``DeltaReader``).

It is stored like a dense delta (one ``values`` field) but is not one: it has no dense form
without its base, so ``materialize`` and ``rows`` refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltawise.delta.base import register_kind
from deltawise.delta.dense import DenseDelta
from deltawise.errors import InputError


@register_kind
@dataclass
class FullDelta(DenseDelta):
    kind = "full"
    replaces = True

    def relative_to(self, base: torch.Tensor) -> DenseDelta:
        self.check_shape(tuple(base.shape), "base tensor")
        return DenseDelta(self.values.to(torch.float64) - base.to(torch.float64))

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise InputError(
            f"a full delta (shape {list(self.shape)}) stores the tensor's new value, not a difference: "
            "it has a dense delta only against a base tensor"
        )

    def rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.materialize(dtype)

    def apply(self, base: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.relative_to(base).apply(base, scale)
