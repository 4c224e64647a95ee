"""Low-rank delta ``ΔW = scale · B A`` (LoRA layout: A is r × in, B is out × r).

``transpose`` covers layers that store W as (in, out) — PEFT's ``fan_in_fan_out`` (GPT-2
Conv1D) and LoRA on embeddings, whose product is ``(B A)ᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deltawise.delta.base import TensorDelta, compute_dtype, register_kind


@register_kind
@dataclass
class LowRankDelta(TensorDelta):
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float = 1.0
    transpose: bool = False
    kind = "lowrank"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        out, inp = int(self.B.shape[0]), int(self.A.shape[1])
        return (inp, out) if self.transpose else (out, inp)

    def fields(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"A": self.A, "B": self.B}, {"scale": self.scale, "transpose": self.transpose}

    @classmethod
    def from_fields(cls, shape, tensors, meta) -> "LowRankDelta":
        d = cls(tensors["A"], tensors["B"], float(meta.get("scale", 1.0)), bool(meta.get("transpose", False)))
        d.check_shape(tuple(shape), "recorded tensor")
        return d

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # multiply in at least float32 even for bf16 factors, then scale once
        work = compute_dtype(dtype, self.A, self.B)
        product = self.scale * (self.B.to(work) @ self.A.to(work))
        return (product.T if self.transpose else product).to(dtype)

    def rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.transpose:
            return super().rows(start, stop, dtype)
        # only the rows asked for: B[start:stop] @ A, never the whole product
        work = compute_dtype(dtype, self.A, self.B)
        return (self.scale * (self.B[start:stop].to(work) @ self.A.to(work))).to(dtype)
