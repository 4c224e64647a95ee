"""The Gram matrix of a tensor's inputs, for methods whose result is a linear combination of them.

Multi-SLERP and the Karcher mean work on the unit hypersphere of whole flattened tensors: every
quantity they need (norms, angles, the iterates themselves) is a combination of the inputs'
pairwise dot products, and the result is sum_i c_i x_i. So one streaming pass collects
G_ij = <x_i, x_j> (float64, over row chunks), the coefficients c are computed from G alone,
and each chunk is then merged as sum_i c_i x_i: the memory is that of the row chunks, not of
the whole tensors that mergekit holds.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from deltawise.merge.base import StatsPass, TensorJob


def vectors(job: TensorJob) -> list[torch.Tensor]:
    """The vectors a spherical method combines: task vectors with a base, else the models."""
    return job.models if job.base is None else job.deltas(scratch=True)


class Gram(StatsPass):
    """G_ij = <x_i, x_j> over the whole tensor, x_i as ``vectors`` gives them."""

    label = "Gram matrix"

    def __init__(self) -> None:
        self.matrix: Optional[torch.Tensor] = None

    def update(self, job: TensorJob) -> None:
        stacked = torch.stack([v.reshape(-1).double() for v in vectors(job)])
        products = (stacked @ stacked.T).cpu()
        self.matrix = products if self.matrix is None else self.matrix + products


def quadratic(gram: torch.Tensor, c: torch.Tensor) -> float:
    """||sum_i c_i x_i||^2 from the Gram matrix (clipped at 0 against rounding)."""
    return max(0.0, float(c @ gram @ c))


def norm_of(gram: torch.Tensor, c: torch.Tensor) -> float:
    return math.sqrt(quadratic(gram, c))


def combine(job: TensorJob, coefficients: Sequence[float]) -> torch.Tensor:
    """sum_i c_i x_i for this chunk, plus the base when the x_i are task vectors."""
    xs = vectors(job)
    out = torch.mul(xs[0], float(coefficients[0]), out=job.scratch("combined", xs[0]))
    for x, c in zip(xs[1:], coefficients[1:]):
        out.add_(x, alpha=float(c))
    if job.base is not None:
        out.add_(job.base)
    return out
