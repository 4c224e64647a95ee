"""Linear merge: weighted average of whole models (uniform soup with equal weights).

Wortsman et al. 2022, "Model soups" (arXiv 2203.05482).
    theta = sum_i w_i theta_i / sum_i w_i      (without the division if normalize: false)
A base_model, if given, is averaged in too (appended to the models when not listed, with the
recipe-wide weight, as mergekit does) and supplies the output's tensor names and config.
"""

from __future__ import annotations

from typing import Optional

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.fused import FusedSpec
from deltawise.merge.methods.common import WEIGHT, normalize


@register
class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of the models (model soup)"
    reference = "https://arxiv.org/abs/2203.05482"
    base_policy = "input"
    params = (WEIGHT, normalize(True))
    propagates_nonfinite = True  # sums and scalings of every input entry

    def check(self, plan):
        problems = []
        for tensor in plan.merged:
            if tensor.params["normalize"] and abs(sum(p["weight"] for p in tensor.model_params)) < 1e-12:
                problems.append(f"weights of {tensor.name} sum to 0 with normalize: true (division by zero)")
                break
        return problems

    def fused(self, params, model_params):
        weights = tuple(float(p["weight"]) for p in model_params)
        return FusedSpec("linear", weights, sum(weights) if params["normalize"] else None)

    def merge(self, job: TensorJob) -> torch.Tensor:
        weights = [p["weight"] for p in job.model_params]
        out = job.scratch("sum", job.models[0])
        if job.params["normalize"]:
            return weighted_average(job.models, weights, out=out)
        return weighted_sum(job.models, weights, out=out)


def weighted_sum(models: list[torch.Tensor], weights: list[float], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    result = torch.mul(models[0], weights[0], out=out)
    for model, w in zip(models[1:], weights[1:]):
        result.add_(model, alpha=w)
    return result


def weighted_average(models: list[torch.Tensor], weights: list[float], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_i w_i theta_i / sum_i w_i, accumulated in the models' order (the soup's arithmetic)."""
    return weighted_sum(models, weights, out=out).div_(sum(weights))
