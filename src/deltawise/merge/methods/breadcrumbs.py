"""Model Breadcrumbs: keep a middle band of task-vector magnitudes (drop the tiny entries and
the largest outliers), then add (breadcrumbs) or merge with TIES sign consensus
(breadcrumbs_ties).

Davari & Belilovsky 2024, "Model Breadcrumbs" (arXiv 2312.06795).
    mask_t keeps entries whose magnitude rank from the top lies in (gamma*n, (gamma+density)*n]
    theta = theta_0 + lambda * sum_t w_t mask_t * tau_t
granularity: tensor (mergekit default: n = tensor size; if density+gamma > 1 the outlier cut
shrinks), row (the official code: per row of the last dimension, the outlier cut is kept), or
global (n = whole model, one band per model).
Ties at the band's ends: with tensor granularity, tie_rule "mergekit" (the default) keeps exactly
the band of mergekit 0.1.5 on CPU, positions [n_bot, n_bot + n_keep) of its unstable ascending
sort (see ``thresholds.py``), "index" exactly that many with a stable sort's order (lower flat
index first), "all" every entry equal to an end value; row granularity ranks by a
stable sort (among equal magnitudes the lower column index ranks higher); global granularity
keeps every entry equal to an end value.
"""

from __future__ import annotations

import torch

from deltawise.merge.fused_sparse import fused_spec
from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.methods.common import DENSITY, INT8_MASK, LAMBDA, WEIGHT, normalize
from deltawise.merge.params import Param
from deltawise.merge.sparsify import band_mask_rows, combine, trim_listed
from deltawise.merge.thresholds import TIE_RULE, GlobalTopK, band_passes, chunk_offset

GAMMA = Param("gamma", float, 0.01, scope="model", low=0.0, high=1.0,
              help="fraction of largest-magnitude entries removed as outliers")
GRANULARITY = Param(
    "granularity", str, "tensor", choices=("tensor", "row", "global"),
    help="rank magnitudes per tensor (mergekit), per row (paper code) or over the whole model",
)


class _Breadcrumbs(MergeMethod):
    consensus: str | None = None
    reference = "https://arxiv.org/abs/2312.06795"

    def check(self, plan):
        return GlobalTopK.check(plan)

    def stats_passes(self, plan, stats):
        if GlobalTopK.used(plan):
            topk = GlobalTopK(plan)
            yield from band_passes(topk.total, topk.densities, topk.gammas, stats)

    def tensor_passes(self, params, model_params, numel, stats):
        if params["granularity"] == "tensor":
            densities, gammas = [p["density"] for p in model_params], [p["gamma"] for p in model_params]
            yield from band_passes(numel, densities, gammas, stats, params["tie_rule"], per_tensor=True)

    def masked(self, job: TensorJob) -> list[torch.Tensor]:
        out = []
        offset = chunk_offset(job)
        ties = job.stats.get("tie_keep") or [None] * len(job.models)
        for i, (delta, p) in enumerate(zip(job.deltas(), job.model_params)):
            if job.params["granularity"] == "row":
                out.append(delta.mul_(band_mask_rows(delta, p["density"], p["gamma"])))
            else:
                out.append(trim_listed(delta, *job.stats["bands"][i], ties[i], offset))
        return out

    def fused(self, params, model_params):
        if params["granularity"] == "row":
            return None
        return fused_spec(model_params, "band", self.consensus, params["normalize"], params["lambda"])

    def merge(self, job: TensorJob) -> torch.Tensor:
        return combine(
            job.base, self.masked(job), job.weights(), consensus=self.consensus,
            normalize=job.params["normalize"], scale=job.params["lambda"],
        )


@register
class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"
    summary = "keep a middle band of task-vector magnitudes, then task arithmetic"
    params = (WEIGHT, DENSITY, GAMMA, LAMBDA, normalize(False), GRANULARITY, TIE_RULE)


@register
class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    summary = "Breadcrumbs masks, then TIES sign consensus"
    consensus = "mergekit"
    params = (WEIGHT, DENSITY, GAMMA, LAMBDA, normalize(False), GRANULARITY, TIE_RULE, INT8_MASK)
