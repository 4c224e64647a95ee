"""Shared building blocks of the task-vector methods: masks, rescaling, sign election.

Magnitude thresholds themselves are computed in ``thresholds.py`` (exact, streaming).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch


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


def bernoulli_mask(delta: torch.Tensor, density: float, uniform: torch.Tensor) -> torch.Tensor:
    """DARE's random keep mask: each entry kept independently with probability ``density``."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return uniform < density


def rank_probabilities(n: int, density: float, epsilon: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DELLA's (MagPrune) keep probability of each ascending magnitude rank r = 0..n-1 of a row of n:
    (density - epsilon) + 2 epsilon r / (n - 1), in ``dtype`` as della.py has always computed it; a row of one
    entry keeps it with probability density. The fused kernel reads the same table."""
    if n <= 1:
        return torch.full((max(n, 0),), density, dtype=dtype)
    return (density - epsilon) + torch.arange(n).to(dtype).div_(n - 1).mul_(2 * epsilon)


def trim(delta: torch.Tensor, lower: Optional[float] = None, upper: Optional[float] = None) -> torch.Tensor:
    """Zero the entries of ``delta`` outside lower <= |x| <= upper, in place (None: unbounded)."""
    if lower is None and upper is None:
        return delta
    magnitude = delta.abs()
    if lower is not None:
        delta.masked_fill_(magnitude < lower, 0)
    if upper is not None:
        delta.masked_fill_(magnitude > upper, 0)
    return delta


def trim_listed(
    delta: torch.Tensor,
    lower: Optional[float],
    upper: Optional[float],
    listed: Optional[torch.Tensor],
    offset: int = 0,
) -> torch.Tensor:
    """Zero the entries of ``delta`` outside a top-k selection, in place.

    ``listed`` None: the bounds are inclusive (``trim``). Otherwise the bounds are exclusive and
    the entries at the ``listed`` sorted flat indices of the whole tensor are kept besides (the
    tied entries a tie rule chose at a boundary); ``delta`` is the chunk of that tensor whose
    first entry has flat index ``offset``.
    """
    if listed is None:
        return trim(delta, lower, upper)
    magnitude = delta.abs()
    keep = torch.ones_like(magnitude, dtype=torch.bool)
    if lower is not None:
        keep &= magnitude > lower
    if upper is not None:
        keep &= magnitude < upper
    first, last = (int(i) for i in torch.searchsorted(listed, torch.tensor([offset, offset + delta.numel()])))
    if last > first:
        keep.view(-1)[(listed[first:last] - offset).to(delta.device)] = True
    return delta.masked_fill_(keep.logical_not_(), 0)


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
    """theta_0 + scale * aggregate(w_t * tau_t): the generalized task arithmetic (see ``aggregate``)."""
    mixed = aggregate(deltas, weights, consensus=consensus, normalize=normalize, majority_sign=majority_sign)
    if scale != 1:
        mixed.mul_(scale)
    return mixed.add_(base)


def aggregate(
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    *,
    consensus: Optional[Literal["mergekit", "ties"]],
    normalize: bool,
    majority_sign: float = 1.0,
) -> torch.Tensor:
    """The combined task vector aggregate(w_t * tau_t).

    Without consensus the aggregate is the (optionally weight-normalised) sum. With consensus
    a sign is elected per entry from the weighted sum and only agreeing entries are combined
    ("disjoint merge"), divided by the summed weights of the agreeing models if ``normalize``.
    Election ties: "mergekit" gives +1 to a zero sum; "ties" (official code) gives the
    ``majority_sign`` of the whole model, and a zero majority selects negative entries.

    The ``deltas`` are scaled in place (callers pass fresh task vectors); the models are
    accumulated one at a time instead of stacked, so memory holds a few tensors, not T.
    """
    w = [float(x) for x in weights]
    for delta, wt in zip(deltas, w):
        if wt != 1:
            delta.mul_(wt)
    # the plain sum may accumulate into the first (fresh, scaled) task vector; the consensus
    # path reads every task vector again after summing, so it sums into a copy
    total = deltas[0] if consensus is None else deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    if consensus is None:
        mixed = total
        divisor = sum(w)
        if normalize and abs(divisor) >= 1e-8:
            mixed.div_(divisor)
    else:
        if consensus == "mergekit":
            positive = total >= 0
        else:
            positive = total > 0
            if majority_sign > 0:
                positive |= total == 0
        elected = positive.to(total.dtype).mul_(2).sub_(1)  # +1 / -1 per entry
        mixed = torch.zeros_like(total)
        divisor = torch.zeros_like(total) if normalize else None
        for delta, wt in zip(deltas, w):
            # delta agrees with the elected sign iff delta * elected > 0 (zeros never agree)
            disagree = delta.mul(elected) <= 0
            mixed.add_(delta.masked_fill_(disagree, 0))
            if divisor is not None:
                divisor.add_(disagree.logical_not_(), alpha=wt)
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1)
            mixed.div_(divisor)
    return mixed
