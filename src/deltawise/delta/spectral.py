"""Spectral delta (FourierFT): ``ΔW = α · Re(ifft2(F))`` with ``F`` zero except ``n`` entries.

``indices`` are flat positions in the ``out × in`` grid (row = i // in, col = i % in), as PEFT's
FourierFT layer draws them; ``coefficients`` the learnt spectrum. ``ifft2`` uses torch's default
normalisation (a factor ``1/(out·in)``) and always runs in float32 or float64 (Gao et al. 2024, arXiv 2405.03003).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deltawise.delta.base import TensorDelta, compute_dtype, register_kind


@register_kind
@dataclass
class SpectralDelta(TensorDelta):
    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, flat positions
    coefficients: torch.Tensor  # one per index
    alpha: float = 1.0
    kind = "spectral"

    def __post_init__(self) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"a spectral delta needs a 2-D tensor, got shape {list(self.shape)}")

    def fields(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"indices": self.indices, "coefficients": self.coefficients}, {"alpha": self.alpha}

    @classmethod
    def from_fields(cls, shape, tensors, meta) -> "SpectralDelta":
        return cls(tuple(shape), tensors["indices"], tensors["coefficients"], float(meta.get("alpha", 1.0)))

    @property
    def natural_dtype(self) -> torch.dtype:
        return compute_dtype(self.coefficients)

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        work = compute_dtype(dtype, self.coefficients)
        spectrum = torch.zeros(self.shape, dtype=work)
        spectrum.view(-1)[self.indices.long()] = self.coefficients.to(work)
        return (self.alpha * torch.fft.ifft2(spectrum).real).to(dtype)
