"""SCE: select the task-vector entries where the models vary most, weight each model by the
energy of its selected task vector, erase entries against the majority sign, and average.

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990), section 3.3.
As mergekit 0.1.5 computes it (merge_methods/sce.py), per tensor with T task vectors tau_t:
    select:    v_j = Var_t(tau_t,j) (population variance); keep the k = int(select_topk * #{v_j != 0})
               entries of largest v_j, zero the rest in every tau_t   (select_topk >= 1: keep all)
    calculate: w_t = mean_j(tau_t,j^2) / sum_s mean_j(tau_s,j^2)   (1/T if that sum is < 1e-6)
    erase:     e_t,j = [sgn(tau_t,j) = sgn(sum_s tau_s,j)], a zero sum electing +
    merge:     theta = theta_0 + sum_t w_t e_t tau_t / max(sum_t w_t e_t, 1e-6)
The variance threshold, the nonzero count and the energies are whole-tensor statistics, gathered
by streaming passes over row chunks (exact order statistics, ``merge/stats.py``). Exactly k entries
are selected: among entries tied at the threshold the first ones in row-major order are kept
(mergekit's ``torch.topk`` leaves the choice among ties unspecified).
"""

from __future__ import annotations

from typing import Optional

import torch

from deltawise.merge.base import MergeMethod, StatsPass, TensorJob, register
from deltawise.merge.methods.common import INT8_MASK
from deltawise.merge.params import Param
from deltawise.merge.stats import OrderStatistics

SELECT_TOPK = Param(
    "select_topk", float, 1.0, low=0.0, high=1.0,
    help="fraction of the entries with nonzero variance across models that are kept (1: all)",
)


def variance(job: TensorJob) -> torch.Tensor:
    """Population variance across the task vectors, per entry."""
    return torch.var(torch.stack(job.deltas()), dim=0, unbiased=False)


class NonzeroVariance(StatsPass):
    label = "SCE variance support"

    def __init__(self):
        self.count = 0

    def update(self, job: TensorJob) -> None:
        self.count += int(torch.count_nonzero(variance(job)))


class ThresholdTies(StatsPass):
    """Per chunk (by first row): how many entries equal the selection threshold, so that each chunk
    knows how many tied entries earlier chunks already took."""

    label = "SCE selection ties"

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.above = 0
        self.ties: dict[int, int] = {}

    def update(self, job: TensorJob) -> None:
        var = variance(job)
        self.above += int((var > self.threshold).sum())
        self.ties[job.row_start] = int((var == self.threshold).sum())

    def ties_before(self, needed: int) -> dict[int, int]:
        """Per chunk start: the number of tied entries it may keep, first come first kept."""
        allowed, taken = {}, 0
        for start in sorted(self.ties):
            allowed[start] = max(0, min(self.ties[start], needed - taken))
            taken += allowed[start]
        return allowed


def selection_mask(job: TensorJob) -> Optional[torch.Tensor]:
    """The entries kept by the variance selection (None: all), from the tensor's passes."""
    selection = job.stats["sce_selection"]
    if selection is None:
        return None
    threshold, allowed = selection
    like = job.models[0]
    if threshold is None:
        return torch.zeros_like(like, dtype=torch.bool)
    var = variance(job)
    mask = var > threshold
    quota = allowed.get(job.row_start, 0)
    if quota:
        tied = (var == threshold).reshape(-1)
        first = tied & (tied.cumsum(0) <= quota)
        mask |= first.reshape(var.shape)
    return mask


def selected(job: TensorJob) -> list[torch.Tensor]:
    deltas = job.deltas()
    mask = selection_mask(job)
    if mask is not None:
        for d in deltas:
            d.mul_(mask)
    return deltas


class Energies(StatsPass):
    """sum_j tau_t,j^2 of each selected task vector over the whole tensor."""

    label = "SCE model weights"

    def __init__(self):
        self.sums: list[float] = []

    def update(self, job: TensorJob) -> None:
        taus = selected(job)
        if not self.sums:
            self.sums = [0.0] * len(taus)
        for i, tau in enumerate(taus):
            self.sums[i] += float(tau.double().square().sum())

    def weights(self, numel: int) -> list[float]:
        means = [s / max(1, numel) for s in self.sums]
        total = sum(means)
        if abs(total) < 1e-6:
            return [1.0 / len(means)] * len(means)
        return [m / total for m in means]


@register
class Sce(MergeMethod):
    name = "sce"
    summary = "select high-variance entries, weight models by task-vector energy, erase minority signs"
    reference = "https://arxiv.org/abs/2408.07990"
    params = (SELECT_TOPK, INT8_MASK)

    def tensor_passes(self, params, model_params, numel, stats):
        topk = params["select_topk"]
        stats["sce_selection"] = None
        if topk <= 0:
            stats["sce_selection"] = (None, {})
        elif topk < 1:
            nonzero = NonzeroVariance()
            yield nonzero
            k = int(nonzero.count * topk)
            if k == 0:
                stats["sce_selection"] = (None, {})
            else:
                order = OrderStatistics(lambda job: [variance(job)], [[numel - k + 1]])
                yield from order.passes()
                threshold = order.values[0][0]
                ties = ThresholdTies(threshold)
                yield ties
                stats["sce_selection"] = (threshold, ties.ties_before(k - ties.above))
        energies = Energies()
        yield energies
        stats["sce_weights"] = energies.weights(numel)

    def merge(self, job: TensorJob) -> torch.Tensor:
        taus = selected(job)
        total = taus[0].clone()
        for tau in taus[1:]:
            total.add_(tau)
        elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
        merged = torch.zeros_like(total)
        divisor = torch.zeros_like(total)
        for tau, weight in zip(taus, job.stats["sce_weights"]):
            agree = torch.sign(tau) == elected
            w = agree.to(tau.dtype).mul_(weight)
            merged.add_(tau * w)
            divisor.add_(w)
        return merged.div_(divisor.clamp_(min=1e-6)).add_(job.base)
