"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228).

A top-k singular vector of the fine-tuned matrix is an *intruder* when no singular vector of the
pre-trained matrix resembles it: max_i |cos(u_j, u0_i)| < eps, taken over ALL of W0's vectors.

Two ways to the same numbers. ``method="exact"`` is the definition as written: a full float64 SVD
of both matrices. ``method="fast"`` (the default) gets the same vectors from eigendecompositions of
the Gram matrix on the smaller side (``W W^T`` or ``W^T W``), in float64: a symmetric
eigendecomposition of an r x r matrix (r = min(m, n)) costs a fraction of an SVD of m x n. None of
W0's vectors can be dropped (the max |cos| with an orthonormal basis is the largest coefficient of
the vector in that basis, not its norm), so the base's decomposition is complete, but it is made
once per tensor; of the fine-tuned matrix only the top k vectors are kept. Where the requested side
is the larger dimension, its vectors come from the other side's as ``W v / s``; that division loses
accuracy as s -> 0, so a matrix whose smallest needed singular value is below ``GRAM_RCOND`` of the
largest falls back to the exact SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from deltawise.architecture import TensorRoles, architecture_for

Side = Literal["left", "right"]
Method = Literal["fast", "exact"]
# Below this many entries the exact SVD runs in float64: in float32, near-degenerate singular vectors of
# small matrices rotate enough to produce spurious low similarities.
FLOAT64_MAX_NUMEL = 1 << 22
# Gram eigenvalues are accurate to about 1e-16 * s_max^2, so singular values down to ~1e-8 * s_max are
# resolved; vectors recovered as W v / s keep an error near 1e-16 * s_max / s, far below any eps at 1e-6.
GRAM_RCOND = 1e-6


@dataclass(frozen=True)
class Intruders:
    count: int
    similarities: list[float]  # c_j for the top-k singular vectors of W_ft, in order of singular value
    singular_values: list[float]  # top-k singular values of W_ft
    base_singular_values: list[float]  # top-k singular values of W0


def base_singular(w: torch.Tensor, side: Side = "left", method: Method = "fast") -> tuple[torch.Tensor, torch.Tensor]:
    """The base matrix's singular vectors (all of them, as columns) and values, computed once for several fine-tunes."""
    return _svd(w, side) if method == "exact" else _gram_singular(w, side, None)


def _svd(w: torch.Tensor, side: Side) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular vectors as columns (left: U, right: V) and singular values, descending."""
    dtype = torch.float64 if w.numel() <= FLOAT64_MAX_NUMEL else torch.float32
    u, s, vh = torch.linalg.svd(w.to(dtype), full_matrices=False)
    return (u if side == "left" else vh.T), s


def _gram_singular(w: torch.Tensor, side: Side, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``_svd`` (the first ``k`` vectors, or all min(m, n) of them), through the Gram matrix on the smaller side.

    Left vectors are the eigenvectors of W W^T, right ones those of W^T W, with eigenvalues s^2; when
    m > n (left) or n > m (right) the smaller Gram gives the other side, and u = W v / s (v = W^T u / s)."""
    w64 = w.to(torch.float64)
    m, n = w64.shape
    r = min(m, n)
    wanted = r if k is None else min(k, r)
    direct = (m <= n) if side == "left" else (n <= m)  # the requested side is the smaller one (either, when square)
    # rows of gram_of live on the side whose Gram we decompose: W's rows give W W^T (left vectors), W^T's give W^T W
    gram_of = w64 if (side == "left") == direct else w64.T
    evals, evecs = torch.linalg.eigh(gram_of @ gram_of.T)
    evals, evecs = evals.flip(0)[:wanted], evecs.flip(1)[:, :wanted]  # eigh is ascending
    s = evals.clamp_min(0).sqrt()
    if direct:
        return evecs, s
    if s.numel() == 0 or s[-1] <= GRAM_RCOND * s[0]:
        vecs, s_exact = _svd(w, side)
        return vecs[:, :wanted], s_exact[:wanted]
    other = gram_of.T @ evecs / s  # the requested side's vectors: W v / s or W^T u / s
    return other, s


def intruder_dimensions(w0: torch.Tensor, w_ft: torch.Tensor, *, k: int = 10, eps: float = 0.5, side: Side = "left",
                        base_svd: Optional[tuple[torch.Tensor, torch.Tensor]] = None, method: Method = "fast") -> Intruders:
    """``base_svd``: ``base_singular(w0, side, method)`` when the caller compares several models with one base.

    ``method``: "fast" (Gram eigendecompositions, top k only for ``w_ft``) or "exact" (full SVDs); both
    give the same count and values up to float64 rounding (see the module docstring)."""
    if w0.ndim != 2 or w0.shape != w_ft.shape:
        raise ValueError(f"need two matrices of one shape, got {tuple(w0.shape)} and {tuple(w_ft.shape)}")
    if method not in ("fast", "exact"):
        raise ValueError(f"method must be 'fast' or 'exact', got {method!r}")
    base_vecs, base_s = base_svd if base_svd is not None else base_singular(w0, side, method)
    if method == "exact":
        vecs, s = _svd(w_ft, side)
    else:
        vecs, s = _gram_singular(w_ft, side, k)
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


def intruder_directions(w0: torch.Tensor, w_ft: torch.Tensor, *, k: int = 10, eps: float = 0.5, side: Side = "left",
                        method: Method = "fast") -> torch.Tensor:
    """The intruders themselves, as columns (float64): those of ``w_ft``'s top-k singular vectors on ``side`` whose
    largest |cos| with every singular vector of ``w0`` is below ``eps``; ``intruder_dimensions(...).count`` of them."""
    if w0.ndim != 2 or w0.shape != w_ft.shape:
        raise ValueError(f"need two matrices of one shape, got {tuple(w0.shape)} and {tuple(w_ft.shape)}")
    base_vecs, _ = base_singular(w0, side, method)
    vecs, _ = _svd(w_ft, side) if method == "exact" else _gram_singular(w_ft, side, k)
    top = vecs[:, : min(k, vecs.shape[1])]
    sims = (top.T @ base_vecs.to(top.dtype)).abs().amax(dim=1)
    return top[:, sims < eps].to(torch.float64)
