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
tie_rule (tensor granularity): "mergekit" keeps exactly k entries, choosing among magnitudes
equal to the k-th largest the ones mergekit 0.1.5 keeps on CPU (see ``thresholds.py``); "index"
exactly k, lower flat index first among equals (streaming); "all" every entry equal to it.
Global granularity keeps every tie, as the official code.
"""

from __future__ import annotations

import torch

from deltawise.merge.fused_sparse import fused_spec
from deltawise.merge.base import MergeMethod, StatsPass, TensorJob, register
from deltawise.merge.methods.common import DENSITY, INT8_MASK, LAMBDA, WEIGHT, normalize
from deltawise.merge.sparsify import aggregate, trim, trim_listed
from deltawise.merge.thresholds import TENSOR_OR_GLOBAL, TIE_RULE, GlobalTopK, chunk_offset, topk_passes


@register
class Ties(MergeMethod):
    name = "ties"
    summary = "trim small task-vector entries, elect signs, average agreeing entries"
    reference = "https://arxiv.org/abs/2306.01708"
    params = (WEIGHT, DENSITY, LAMBDA, normalize(True), TENSOR_OR_GLOBAL, TIE_RULE, INT8_MASK)

    def check(self, plan):
        return GlobalTopK.check(plan)

    def stats_passes(self, plan, stats):
        if not GlobalTopK.used(plan):
            return
        topk = GlobalTopK(plan)
        yield from topk_passes(topk.total, topk.densities, "official", stats)
        sign_pass = MajoritySign(stats["thresholds"])
        yield sign_pass
        stats["majority_sign"] = sign_pass.majority

    def tensor_passes(self, params, model_params, numel, stats):
        if params["granularity"] == "tensor":
            yield from topk_passes(numel, [p["density"] for p in model_params], "mergekit", stats, params.get("tie_rule", "all"),
                                   per_tensor=True)

    def fused(self, params, model_params):
        election = "ties" if params["granularity"] == "global" else "mergekit"
        return fused_spec(model_params, "topk", election, params["normalize"], params["lambda"])

    def merge(self, job: TensorJob) -> torch.Tensor:
        merged = merged_vector(job, normalize=job.params["normalize"])
        scale = job.params["lambda"]
        if scale != 1:
            merged.mul_(scale)
        return merged.add_(job.base)


def merged_vector(job: TensorJob, *, normalize: bool) -> torch.Tensor:
    """The TIES task vector tau_m (trim, elect, disjoint mean or sum), before lambda and the base.
    Needs the thresholds (and, for global granularity, the majority sign) from Ties' passes."""
    offset = chunk_offset(job)
    ties = job.stats.get("tie_keep") or [None] * len(job.models)
    trimmed = [
        trim_listed(d, thr, None, listed, offset)
        for d, thr, listed in zip(job.deltas(scratch=True), job.stats["thresholds"], ties)
    ]
    official = job.params["granularity"] == "global"
    return aggregate(
        trimmed, job.weights(), consensus="ties" if official else "mergekit", normalize=normalize,
        majority_sign=job.stats["majority_sign"] if official else 1.0,
    )


class MajoritySign(StatsPass):
    """sgn(sum over all entries of the elected signs): the official tie-break for zero sums."""

    label = "whole-model sign election"

    def __init__(self, thresholds: list):
        self.thresholds = thresholds
        self.total = 0.0

    def update(self, job: TensorJob) -> None:
        w = job.weights()
        summed = sum(float(wi) * trim(d, thr) for wi, d, thr in zip(w, job.deltas(), self.thresholds))
        self.total += float(torch.sign(summed).sum())

    @property
    def majority(self) -> float:
        return float(torch.sign(torch.tensor(self.total)))
