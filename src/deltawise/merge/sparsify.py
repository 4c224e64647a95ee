"""Shared building blocks of the task-vector methods: masks, rescaling, sign election.

Rank conventions (section 0 of METHODS.md): ``kth_smallest(v, r)`` is the r-th smallest
value (1-indexed). "Keep |v| >= s_r" keeps the entries from rank r upwards, plus any ties.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return flat.kthvalue(rank).values


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Per-tensor top-``density`` by magnitude, counting as mergekit does: keep
    k = max(1, int(density * n)) entries (more only when magnitudes tie at the threshold)."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    magnitude = delta.abs()
    return magnitude >= kth_smallest(magnitude, n - k + 1)


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


def band_mask_tensor(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs over the whole tensor (mergekit's ``magnitude_outliers``): keep the entries
    whose ascending magnitude rank lies in (n_bot, n_bot + n_keep]."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n_bot, n_keep = band_counts(n, density, gamma)
    if n_keep == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs()
    lower = kth_smallest(magnitude, n_bot + 1)
    upper = kth_smallest(magnitude, n_bot + n_keep)
    return (magnitude >= lower) & (magnitude <= upper)


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


def bernoulli_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's random keep mask: each entry kept independently with probability ``density``."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32) < density


RescaleMode = Literal["l1", "inverse_density"]


def rescale(masked: torch.Tensor, original: torch.Tensor, mode: RescaleMode, density: float) -> torch.Tensor:
    """Restore the size of a sparsified delta.

    ``inverse_density`` divides by the keep probability (the DARE paper: an unbiased estimate
    of the delta); ``l1`` matches the L1 norm of the original (mergekit's choice).
    """
    if mode == "inverse_density":
        return masked / density if 0 < density < 1 else masked
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


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
