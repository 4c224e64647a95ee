"""Model Stock: move from the base towards the average of fine-tuned models by an amount set
by how much their updates agree.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models" (arXiv 2403.19522).
With N models and cos(theta) the mean pairwise cosine between task vectors tau_i (per tensor,
or per row with filter_wise: along the last dimension):
    t = N cos(theta) / (1 + (N - 1) cos(theta));   theta = t * mean_i(theta_i) + (1 - t) * theta_0
Where the denominator vanishes (|.| < 1e-6) the base is kept, as in mergekit. Per tensor, the
Gram matrix of the task vectors is accumulated over row chunks first.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import MergeMethod, StatsPass, TensorJob, register
from deltawise.merge.params import Param


def interpolation_ratio(gram: torch.Tensor) -> torch.Tensor:
    """t from Gram matrices of task vectors, shape (..., N, N)."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cosines = [
        (gram[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(n) for j in range(i + 1, n)
    ]
    cos = torch.stack(cosines).mean(dim=0)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))


def task_gram(job: TensorJob, rows: bool) -> torch.Tensor:
    taus = torch.stack(job.deltas()).double()
    taus = taus.reshape(taus.shape[0], -1, taus.shape[-1]) if rows else taus.reshape(taus.shape[0], 1, -1)
    return torch.einsum("irk,jrk->rij", taus, taus)  # one Gram matrix per row (or one in all)


class Gram(StatsPass):
    label = "Model Stock agreement"

    def __init__(self):
        self.gram = None

    def update(self, job: TensorJob) -> None:
        g = task_gram(job, rows=False)
        self.gram = g if self.gram is None else self.gram + g


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "interpolate base -> average, by the agreement (cosine) of the task vectors"
    reference = "https://arxiv.org/abs/2403.19522"
    min_models = 2
    params = (Param("filter_wise", bool, False, help="one interpolation ratio per row instead of per tensor"),)

    def tensor_passes(self, params, model_params, numel, stats):
        if not params["filter_wise"]:
            gram = Gram()
            yield gram
            stats["ratio"] = float(interpolation_ratio(gram.gram)[0])

    def merge(self, job: TensorJob) -> torch.Tensor:
        base = job.base
        average = torch.stack(job.models).mean(dim=0)
        if job.params["filter_wise"]:
            if base.dim() < 2:  # a vector is one row
                ratio = interpolation_ratio(task_gram(job, rows=False))[0]
            else:
                ratio = interpolation_ratio(task_gram(job, rows=True)).reshape(*base.shape[:-1], 1)
            ratio = ratio.to(base.dtype)
        else:
            ratio = job.stats["ratio"]
        return ratio * average + (1 - ratio) * base
