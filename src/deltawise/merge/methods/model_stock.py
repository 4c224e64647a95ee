"""Model Stock: move from the base towards the average of fine-tuned models by an amount set
by how much their updates agree.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models" (arXiv 2403.19522).
With N models and cos(theta) the mean pairwise cosine between task vectors tau_i (per tensor,
or per row with filter_wise: along the last dimension):
    t = N cos(theta) / (1 + (N - 1) cos(theta));   theta = t * mean_i(theta_i) + (1 - t) * theta_0
Where the denominator vanishes (|.| < 1e-6) the base is kept, as in mergekit.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.params import Param


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "interpolate base -> average, by the agreement (cosine) of the task vectors"
    reference = "https://arxiv.org/abs/2403.19522"
    min_models = 2
    params = (Param("filter_wise", bool, False, help="one interpolation ratio per row instead of per tensor"),)

    def elementwise(self, params):
        return bool(params["filter_wise"])  # per-row ratios only need whole rows

    def merge(self, job: TensorJob) -> torch.Tensor:
        base, models = job.base, job.models
        shape = base.shape
        if job.params["filter_wise"] and base.dim() >= 2:
            flat_base = base  # ratios along the last dimension (one per row), as mergekit does
        else:
            flat_base = base.reshape(1, -1)
        flat = [m.reshape(flat_base.shape) for m in models]
        taus = [m - flat_base for m in flat]
        cosines = []
        for i, a in enumerate(taus):
            for b in taus[i + 1 :]:
                denom = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
                cosines.append(((a * b).sum(dim=-1) / denom).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(models)
        denom = 1 + (n - 1) * cos
        singular = denom.abs() < 1e-6
        ratio = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
        average = torch.stack(flat).mean(dim=0)
        return (ratio * average + (1 - ratio) * flat_base).reshape(shape)
