"""Consensus merging: keep only the weights that at least k tasks' TALL masks select.

Wang et al. 2024, "Localizing Task Information for Improved Model Merging and Compression"
(ICML 2024, arXiv 2405.07813), official code ``nik-dim/tall_masks``.
    tau_t = theta_t - theta_0
    tau_MTL = sum_t tau_t                                  (multi_task: task_arithmetic)
            = TIES(tau_1..tau_T), top-density trim, mass sign, disjoint SUM   (multi_task: ties)
    TALL mask:  m_t = 1[ |tau_t| > lambda_t * |tau_MTL - tau_t| ]      (strict, as in the code;
                tau_t untrimmed also in the TIES variant, as the code compares to theta_t)
    consensus:  m_cons = 1[ sum_t m_t >= k ]
    theta = theta_0 + alpha * (m_cons * tau_MTL)
Recipe names: ``mask_lambda`` is the per-model lambda_t, ``k`` the minimum number of agreeing
masks, ``lambda`` the final scale alpha (the library-wide name of the scale added to the base).
k = 2 (default) removes "catastrophic" (no task) and "selfish" (one task) weights, k = 1 only
catastrophic ones, k = 0 gives task arithmetic (or TIES with dis-sum), k > T the base model.

Choices on points the paper leaves to validation data (docs/merging.md, "consensus"): the paper picks
each lambda_t from {0.2, ..., 0.6} on that task's validation split and alpha from {0.1, ..., 1.0};
this data-free method uses lambda_t = 0.4 (middle of the grid) and alpha = 1.0 unless set.
The task-arithmetic variant is elementwise (no statistics pass); the TIES variant reuses the
``ties`` method's trim thresholds, per tensor (mergekit counting, the default) or over the whole
model (``granularity: global``, the official counting and majority-sign tie-break), with its
tie rule: per tensor ``tie_rule`` (exactly k, mergekit's order among equal magnitudes, or all
ties), globally every entry equal to the threshold. The TALL masks compare strictly, so an
entry with |tau_t| equal to lambda_t * |tau_MTL - tau_t| is not selected.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.fused_sparse import fused_spec
from deltawise.merge.methods.common import LAMBDA
from deltawise.merge.methods.ties import Ties, merged_vector
from deltawise.merge.params import Param
from deltawise.merge.thresholds import TENSOR_OR_GLOBAL, TIE_RULE

MASK_LAMBDA = Param(
    "mask_lambda", float, 0.4, scope="model", low=0.0,
    help="TALL-mask threshold lambda_t: keep where |tau_t| > lambda_t * |tau_MTL - tau_t| (paper grid 0.2-0.6)",
)
K = Param("k", int, 2, low=0, help="keep entries selected by at least k task masks (2: drop catastrophic and selfish weights)")
MULTI_TASK = Param(
    "multi_task", str, "task_arithmetic", choices=("task_arithmetic", "ties"),
    help="how tau_MTL is built: the plain sum of task vectors, or TIES (trim to density, elect signs, disjoint sum)",
)
DENSITY = Param(
    "density", float, 0.2, scope="model", low=0.0, high=1.0,
    help="multi_task: ties only: fraction of each task vector kept by the TIES trim (paper: 0.2)",
)


def tall_masks(deltas: list[torch.Tensor], multi_task: torch.Tensor, lambdas: list[float]) -> list[torch.Tensor]:
    """m_t = |tau_t| > lambda_t * |tau_MTL - tau_t| for each task (boolean tensors)."""
    return [delta.abs() > (multi_task - delta).abs_().mul_(lam) for delta, lam in zip(deltas, lambdas)]


def _uses_ties(plan) -> bool:
    return any(t.params["multi_task"] == "ties" for t in plan.merged)


@register
class Consensus(MergeMethod):
    name = "consensus"
    summary = "task arithmetic (or TIES) restricted to weights that at least k tasks' TALL masks select"
    reference = "https://arxiv.org/abs/2405.07813"
    params = (MASK_LAMBDA, K, LAMBDA, MULTI_TASK, DENSITY, TENSOR_OR_GLOBAL, TIE_RULE)

    def check(self, plan):
        if not _uses_ties(plan):
            return []
        if (len({t.params["multi_task"] for t in plan.merged}) > 1
                and any(t.params["granularity"] == "global" for t in plan.merged)):
            return ["with granularity: global, multi_task must be the same for every tensor"]
        return Ties().check(plan)

    def fused(self, params, model_params):
        tall = (int(params["k"]), tuple(float(p["mask_lambda"]) for p in model_params))
        if params["multi_task"] == "ties":  # the disjoint sum (not normalized) of the TIES-trimmed task vectors
            election = "ties" if params["granularity"] == "global" else "mergekit"
            return fused_spec(model_params, "topk", election, False, params["lambda"], tall=tall)
        # the plain, unweighted sum of the task vectors
        return fused_spec([{} for _ in model_params], "none", None, False, params["lambda"], tall=tall)

    def stats_passes(self, plan, stats):
        if _uses_ties(plan):
            yield from Ties().stats_passes(plan, stats)

    def tensor_passes(self, params, model_params, numel, stats):
        if params["multi_task"] == "ties":
            yield from Ties().tensor_passes(params, model_params, numel, stats)

    def merge(self, job: TensorJob) -> torch.Tensor:
        deltas = job.deltas()
        if job.params["multi_task"] == "ties":
            multi_task = merged_vector(job, normalize=False)  # the paper's TIES variant uses the disjoint sum
        else:
            multi_task = deltas[0].clone()
            for delta in deltas[1:]:
                multi_task.add_(delta)
        masks = tall_masks(deltas, multi_task, [p["mask_lambda"] for p in job.model_params])
        count = torch.zeros_like(multi_task, dtype=torch.int32)
        for mask in masks:
            count.add_(mask)
        multi_task.masked_fill_(count < job.params["k"], 0)
        scale = job.params["lambda"]
        if scale != 1:
            multi_task.mul_(scale)
        return multi_task.add_(job.base)
