"""TIES-merging: trim each task vector to its largest entries, elect a sign per entry, and
average only the entries that agree with it.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models" (arXiv 2306.01708).
    trim:   keep the top-`density` |tau_t| entries (per tensor, or over the whole model)
    elect:  gamma = sgn(sum_t w_t trim(tau_t))
    merge:  tau_m = sum_{t: sgn = gamma} w_t trim(tau_t) / sum_{t: sgn = gamma} w_t
    theta = theta_0 + lambda * tau_m
granularity: tensor (mergekit, the default: k = max(1, int(density*n)) per tensor, zero sums
elect +) or global (official code: one threshold per model over all its tensors, keeping
|tau| >= the (d - int(d*density))-th smallest; zero sums take the model-wide majority sign).
normalize: false gives the "dis-sum" variant.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import MergeMethod, StatsPass, TensorJob, register
from deltawise.merge.global_topk import GLOBAL_OR_TENSOR, GlobalTopK
from deltawise.merge.methods.common import DENSITY, INT8_MASK, LAMBDA, WEIGHT, normalize
from deltawise.merge.sparsify import combine, magnitude_mask, threshold_mask


@register
class Ties(MergeMethod):
    name = "ties"
    summary = "trim small task-vector entries, elect signs, average agreeing entries"
    reference = "https://arxiv.org/abs/2306.01708"
    params = (WEIGHT, DENSITY, LAMBDA, normalize(True), GLOBAL_OR_TENSOR, INT8_MASK)

    def elementwise(self, params):
        return params["granularity"] == "global"

    def check(self, plan):
        return GlobalTopK.check(plan)

    def stats_passes(self, plan, stats):
        if not GlobalTopK.used(plan):
            return
        topk = GlobalTopK(plan)
        yield from topk.passes(stats)
        sign_pass = MajoritySign(stats["thresholds"])
        yield sign_pass
        stats["majority_sign"] = sign_pass.majority

    def merge(self, job: TensorJob) -> torch.Tensor:
        deltas = job.deltas()
        if job.params["granularity"] == "global":
            trimmed = [d * threshold_mask(d, thr) for d, thr in zip(deltas, job.stats["thresholds"])]
            consensus, majority = "ties", job.stats["majority_sign"]
        else:
            trimmed = [d * magnitude_mask(d, p["density"]) for d, p in zip(deltas, job.model_params)]
            consensus, majority = "mergekit", 1.0
        return combine(
            job.base, trimmed, job.weights(), consensus=consensus,
            normalize=job.params["normalize"], scale=job.params["lambda"], majority_sign=majority,
        )


class MajoritySign(StatsPass):
    """sgn(sum over all entries of the elected signs): the official tie-break for zero sums."""

    label = "whole-model sign election"

    def __init__(self, thresholds: list):
        self.thresholds = thresholds
        self.total = 0.0

    def update(self, job: TensorJob) -> None:
        w = job.weights()
        summed = sum(wi * d * threshold_mask(d, thr) for wi, d, thr in zip(w, job.deltas(), self.thresholds))
        self.total += float(torch.sign(summed).sum())

    @property
    def majority(self) -> float:
        return float(torch.sign(torch.tensor(self.total)))
