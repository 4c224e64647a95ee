"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228).

A top-k singular vector of the fine-tuned matrix is an *intruder* when no singular vector of the
pre-trained matrix resembles it: max_i |cos(u_j, u0_i)| < eps, taken over ALL of W0's vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from deltawise.architecture import TensorRoles, architecture_for

Side = Literal["left", "right"]
# Below this many entries the SVD runs in float64: in float32, near-degenerate singular vectors of
# small matrices rotate enough to produce spurious low similarities.
FLOAT64_MAX_NUMEL = 1 << 22


@dataclass(frozen=True)
class Intruders:
    count: int
    similarities: list[float]  # c_j for the top-k singular vectors of W_ft, in order of singular value
    singular_values: list[float]  # top-k singular values of W_ft
    base_singular_values: list[float]  # top-k singular values of W0


def base_singular(w: torch.Tensor, side: Side = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """The base matrix's singular vectors and values, computed once for several fine-tunes."""
    return _svd(w, side)


def _svd(w: torch.Tensor, side: Side) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular vectors as columns (left: U, right: V) and singular values, descending."""
    dtype = torch.float64 if w.numel() <= FLOAT64_MAX_NUMEL else torch.float32
    u, s, vh = torch.linalg.svd(w.to(dtype), full_matrices=False)
    return (u if side == "left" else vh.T), s


def intruder_dimensions(w0: torch.Tensor, w_ft: torch.Tensor, *, k: int = 10, eps: float = 0.5, side: Side = "left",
                        base_svd: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Intruders:
    """``base_svd``: ``base_singular(w0, side)`` when the caller compares several models with one base."""
    if w0.ndim != 2 or w0.shape != w_ft.shape:
        raise ValueError(f"need two matrices of one shape, got {tuple(w0.shape)} and {tuple(w_ft.shape)}")
    base_vecs, base_s = base_svd if base_svd is not None else _svd(w0, side)
    vecs, s = _svd(w_ft, side)
    k = min(k, vecs.shape[1])
    # singular vectors are unit norm, so |dot| is |cos|; abs because their signs are arbitrary
    sims = (vecs[:, :k].T @ base_vecs.to(vecs.dtype)).abs().amax(dim=1)
    return Intruders(
        count=int((sims < eps).sum()), similarities=sims.tolist(),
        singular_values=s[:k].tolist(), base_singular_values=base_s[:k].tolist(),
    )


def is_analysed_matrix(name: str, shape: tuple[int, ...], roles: TensorRoles | None = None) -> bool:
    """Linear weights inside the model (the ones LoRA adapts): embedding tables and output heads
    (LM head, classification head) are excluded, as are matrices with a dimension below 2."""
    roles = roles or architecture_for(None)
    return roles.is_linear_weight(name, shape) and not roles.is_head(name) and min(shape) >= 2
