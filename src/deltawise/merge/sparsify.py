"""Shared building blocks of the task-vector methods: masks, rescaling, sign election.

Magnitude thresholds themselves are computed in ``thresholds.py`` (exact, streaming).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch


def threshold_mask(delta: torch.Tensor, threshold: Optional[float]) -> torch.Tensor:
    """Keep |delta| >= threshold (a whole-model threshold); None keeps everything."""
    if threshold is None:
        return torch.ones_like(delta, dtype=torch.bool)
    return delta.abs() >= threshold


def band_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, n_keep) for Breadcrumbs on n entries, mergekit's rule: drop the int(gamma*n)
    largest, keep int(density*n) below them, shrinking the outlier cut if both do not fit."""
    n_keep = int(density * n)
    n_top = int(gamma * n)
    return max(0, n - n_keep - n_top), n_keep


def band_mask_rows(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs per row of the last dimension (the official ``TaskVectorMiddleKeep``): drop
    the int(n*gamma) largest entries of each row, then keep the int(n*density) largest of the
    rest. 0-d tensors are kept whole."""
    if delta.dim() == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.shape[-1]
    n_top, n_keep = int(n * gamma), int(n * density)
    order = delta.abs().argsort(dim=-1, descending=True, stable=True)
    rank_from_top = torch.empty_like(order)
    rank_from_top.scatter_(-1, order, torch.arange(n, device=delta.device).expand_as(order))
    return (rank_from_top >= n_top) & (rank_from_top < n_top + n_keep)


def band_mask_thresholds(delta: torch.Tensor, lower: Optional[float], upper: Optional[float]) -> torch.Tensor:
    """Breadcrumbs with whole-model thresholds: keep lower <= |delta| <= upper."""
    magnitude = delta.abs()
    mask = torch.ones_like(delta, dtype=torch.bool)
    if lower is not None:
        mask &= magnitude >= lower
    if upper is not None:
        mask &= magnitude <= upper
    return mask


def bernoulli_mask(delta: torch.Tensor, density: float, uniform: torch.Tensor) -> torch.Tensor:
    """DARE's random keep mask: each entry kept independently with probability ``density``."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return uniform < density


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    *,
    consensus: Optional[Literal["mergekit", "ties"]],
    normalize: bool,
    scale: float,
    majority_sign: float = 1.0,
) -> torch.Tensor:
    """theta_0 + scale * aggregate(w_t * tau_t): the generalized task arithmetic.

    Without consensus the aggregate is the (optionally weight-normalised) sum. With consensus
    a sign is elected per entry from the weighted sum and only agreeing entries are combined
    ("disjoint merge"), divided by the summed weights of the agreeing models if ``normalize``.
    Election ties: "mergekit" gives +1 to a zero sum; "ties" (official code) gives the
    ``majority_sign`` of the whole model, and a zero majority selects negative entries.
    """
    stacked = torch.stack(deltas)
    w = weights.reshape((-1,) + (1,) * (stacked.dim() - 1)).to(stacked.dtype)
    stacked.mul_(w)
    if consensus is None:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    else:
        total = stacked.sum(dim=0)
        if consensus == "mergekit":
            agree = stacked.sign() == torch.where(total >= 0, 1.0, -1.0).to(stacked.dtype)
        else:
            elected = total.sign()
            elected[elected == 0] = majority_sign
            agree = torch.where(elected > 0, stacked > 0, stacked < 0)
        mixed = (stacked * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    if scale != 1:
        mixed = mixed * scale
    return base + mixed
