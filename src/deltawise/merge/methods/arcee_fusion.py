"""Arcee Fusion: keep the other model's changes only where they matter most, judged by an
importance score with an outlier threshold; elsewhere keep the base.

Arcee AI (https://arcee.ai; mergekit 0.1.5 merge_methods/arcee_fusion.py), with a = base and
b = the other model, per row (last dimension; a vector is one row):
    KL = sum_k p_k log(p_k / q_k),  p = softmax(b) + 1e-8,  q = softmax(a) + 1e-8
    importance_j = |b_j - a_j| * KL(row of j)
    threshold = median + 1.5 (Q3 - Q1) of the importance over the whole tensor
    theta = a + (b - a) * [importance >= threshold]
Quantile q is the sorted value at index floor(q (n - 1)). The quantiles are exact order
statistics gathered by streaming passes over row chunks (``merge/stats.py``), so no tensor is
held whole. Where we differ from mergekit: above 1,000,000 entries mergekit estimates the
quantiles from a random sample of 1,000,000 entries (drawn anew in every run), we always
compute them exactly; importances are ranked clamped at 0 (the KL divergence is >= 0, but its
float rounding can leave a tiny negative value where the two rows are almost equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.stats import OrderStatistics

QUANTILES = (0.25, 0.5, 0.75)
PROBABILITY_EPS = 1e-8


def importance(job: TensorJob) -> torch.Tensor:
    """|b - a| times the KL divergence between the softmaxes of the rows of b and a."""
    a, b = job.base, job.models[0]
    p = F.softmax(b, dim=-1) + PROBABILITY_EPS
    q = F.softmax(a, dim=-1) + PROBABILITY_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (b - a).abs() * kl


@register
class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "take the other model's entries whose importance (|change| x row KL divergence) is an outlier"
    reference = "https://arcee.ai"
    min_models = 1
    max_models = 1
    params = ()

    def tensor_passes(self, params, model_params, numel, stats):
        if numel == 0:
            return
        ranks = [int(q * (numel - 1)) + 1 for q in QUANTILES]
        order = OrderStatistics(lambda job: [importance(job).clamp_(min=0)], [ranks])
        yield from order.passes()
        q1, median, q3 = torch.tensor(order.values[0], dtype=torch.float32)
        stats["fusion_threshold"] = median + 1.5 * (q3 - q1)

    def merge(self, job: TensorJob) -> torch.Tensor:
        a, b = job.base, job.models[0]
        if a.numel() == 0:
            return a.clone()
        threshold = job.stats["fusion_threshold"].to(device=a.device, dtype=a.dtype)
        mask = (importance(job) >= threshold).to(a.dtype)
        return a + (b - a) * mask
