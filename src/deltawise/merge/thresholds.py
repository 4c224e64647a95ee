"""Magnitude thresholds for TIES and Breadcrumbs, per tensor or over the whole model.

Both granularities rank |task vector| entries exactly with ``stats.OrderStatistics`` (a
streaming radix select), so a tensor never has to be held whole: per-tensor ranks are
gathered over the tensor's row chunks, global ranks over every chunk of the model. The
official TIES and Breadcrumbs experiments rank over the whole model; mergekit within each
tensor. Global mode needs a density that does not vary between tensors.

Counting rules (n entries, keep fraction k):
- "mergekit" (per tensor): keep max(1, int(k*n)) entries: threshold s_(n - keep + 1);
- "official" (global TIES): keep |x| >= s_(n - int(k*n)), as the paper's ``topk_values_mask``;
- Breadcrumbs band: ascending ranks (n_bot, n_bot + n_keep], see ``sparsify.band_counts``.
A threshold of None keeps everything; +inf keeps nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional

from deltawise.merge.base import StatsPass, TensorJob
from deltawise.merge.params import Param
from deltawise.merge.sparsify import band_counts
from deltawise.merge.stats import OrderStatistics

if TYPE_CHECKING:
    from deltawise.merge.plan import MergePlan

TENSOR_OR_GLOBAL = Param(
    "granularity", str, "tensor", choices=("tensor", "global"),
    help="rank magnitudes within each tensor (mergekit) or over the whole model (paper code)",
)
NOTHING = float("inf")


def _deltas(job: TensorJob):
    return job.deltas()


def keep_rank(n: int, density: float, rule: Literal["mergekit", "official"]) -> tuple[Optional[int], bool]:
    """(rank whose value is the threshold or None, keep_nothing)."""
    if density >= 1 or n == 0:
        return None, False
    if rule == "mergekit":
        if density <= 0:
            return None, True
        return n - max(1, int(density * n)) + 1, False
    rank = n - int(n * density)
    return (rank if rank > 0 else None), False


def topk_passes(n: int, densities: list[float], rule, stats: dict[str, Any]) -> Iterator[StatsPass]:
    """Sets stats["thresholds"][i]: keep |tau_i| >= threshold."""
    plan = [keep_rank(n, k, rule) for k in densities]
    order = OrderStatistics(_deltas, [[rank] for rank, _ in plan])
    if any(rank is not None for rank, _ in plan):
        yield from order.passes()
    stats["thresholds"] = [NOTHING if nothing else values[0] for (_, nothing), values in zip(plan, order.values)]


def band_passes(n: int, densities: list[float], gammas: list[float], stats: dict[str, Any]) -> Iterator[StatsPass]:
    """Sets stats["bands"][i] = (lower, upper): keep lower <= |tau_i| <= upper."""
    ranks, empty = [], []
    for k, g in zip(densities, gammas):
        n_bot, n_keep = band_counts(n, k, g)
        full = k >= 1 or n == 0
        ranks.append([None, None] if full or n_keep == 0 else [n_bot + 1, n_bot + n_keep])
        empty.append(not full and n_keep == 0)
    order = OrderStatistics(_deltas, ranks)
    if any(r[0] is not None for r in ranks):
        yield from order.passes()
    stats["bands"] = [(NOTHING, 0.0) if e else (lo, hi) for e, (lo, hi) in zip(empty, order.values)]


class GlobalTopK:
    """Whole-model thresholds; densities and gammas come from the (uniform) per-model parameters."""

    def __init__(self, plan: "MergePlan"):
        self.total = sum(t.out_numel for t in plan.merged)
        first = plan.merged[0]
        self.densities = [p["density"] for p in first.model_params]
        self.gammas = [p.get("gamma", 0.0) for p in first.model_params]

    @staticmethod
    def used(plan: "MergePlan") -> bool:
        return any(t.params.get("granularity") == "global" for t in plan.merged)

    @staticmethod
    def check(plan: "MergePlan") -> list[str]:
        if not GlobalTopK.used(plan):
            return []
        if len({t.params["granularity"] for t in plan.merged}) > 1:
            return ["granularity must be the same for every tensor when 'global' is used"]
        first = plan.merged[0]
        for t in plan.merged:
            for key in ("density", "gamma"):
                if [p.get(key) for p in t.model_params] != [p.get(key) for p in first.model_params]:
                    return [f"with granularity: global, {key} must not vary between tensors ({t.name} differs)"]
        return []
