"""Whole-model ("global") magnitude thresholds for TIES and Breadcrumbs.

The official TIES and Breadcrumbs experiments rank a task vector's entries over the whole
model; mergekit ranks within each tensor. Global mode needs one streaming statistics pass
over the model before merging (see ``stats.OrderStatistics``), and a density that does not
vary between tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from deltawise.merge.base import StatsPass, TensorJob
from deltawise.merge.params import Param
from deltawise.merge.sparsify import band_counts
from deltawise.merge.stats import OrderStatistics

if TYPE_CHECKING:
    from deltawise.merge.plan import MergePlan

GLOBAL_OR_TENSOR = Param(
    "granularity", str, "tensor", choices=("tensor", "global"),
    help="rank magnitudes within each tensor (mergekit) or over the whole model (paper code)",
)


def _deltas(job: TensorJob):
    return job.deltas()


class GlobalTopK:
    def __init__(self, plan: "MergePlan"):
        self.plan = plan
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
        granularities = {t.params["granularity"] for t in plan.merged}
        if len(granularities) > 1:
            return ["granularity must be the same for every tensor when 'global' is used"]
        first = plan.merged[0]
        for t in plan.merged:
            for key in ("density", "gamma"):
                if [p.get(key) for p in t.model_params] != [p.get(key) for p in first.model_params]:
                    return [f"with granularity: global, {key} must not vary between tensors ({t.name} differs)"]
        return []

    def passes(self, stats: dict[str, Any]) -> Iterator[StatsPass]:
        """TIES: thresholds[i] = s_(d - int(d*density_i)), or None when nothing is trimmed."""
        d = self.total
        ranks = [[d - int(d * k) if d - int(d * k) > 0 else None] for k in self.densities]
        order = OrderStatistics(_deltas, ranks)
        yield from order.passes()
        stats["thresholds"] = [v[0] for v in order.values]

    def band_passes(self, stats: dict[str, Any]) -> Iterator[StatsPass]:
        """Breadcrumbs: bands[i] = (lower, upper) magnitudes kept, None meaning unbounded;
        an empty band (nothing kept) is marked with lower > upper."""
        d = self.total
        ranks = []
        for k, g in zip(self.densities, self.gammas):
            if k >= 1:
                ranks.append([None, None])
                continue
            n_bot, n_keep = band_counts(d, k, g)
            ranks.append([n_bot + 1, n_bot + n_keep] if n_keep else [None, None])
        order = OrderStatistics(_deltas, ranks)
        yield from order.passes()
        bands = []
        for (k, g), (lo, hi) in zip(zip(self.densities, self.gammas), order.values):
            empty = k < 1 and band_counts(d, k, g)[1] == 0
            bands.append((float("inf"), 0.0) if empty else (lo, hi))
        stats["bands"] = bands
