"""Task arithmetic: add (or subtract) scaled task vectors to the base.

Ilharco et al. 2023, "Editing models with task arithmetic" (arXiv 2212.04089).
    tau_t = theta_t - theta_0;   theta = theta_0 + lambda * sum_t w_t tau_t   (/ sum_t w_t if normalize)
Negative weights remove a behaviour; lambda = 1/T with unit weights is plain averaging.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.fused import FusedSpec
from deltawise.merge.methods.common import LAMBDA, WEIGHT, normalize
from deltawise.merge.sparsify import combine


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "base + lambda * weighted sum of task vectors"
    reference = "https://arxiv.org/abs/2212.04089"
    params = (WEIGHT, LAMBDA, normalize(False))
    propagates_nonfinite = True  # sums and scalings of every input entry

    def fused(self, params, model_params):
        # merge() rounds the weights to float32 (job.weights()) and sums the rounded values
        weights = tuple(torch.tensor([p.get("weight", 1.0) for p in model_params], dtype=torch.float32).tolist())
        divisor = sum(weights)
        normalized = params["normalize"] and abs(divisor) >= 1e-8  # as aggregate()
        return FusedSpec("task_arithmetic", weights, divisor if normalized else None, float(params["lambda"]))

    def merge(self, job: TensorJob):
        return combine(
            job.base, job.deltas(scratch=True), job.weights(),
            consensus=None, normalize=job.params["normalize"], scale=job.params["lambda"],
        )
