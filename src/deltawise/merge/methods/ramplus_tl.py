"""RAM+ (tensor-local): RAM with each model's unique entries scaled up by how much it overlaps.

"Reinforced Agent Merging" (arXiv 2601.13572), the RAM+ variant as mergekit 0.1.5 implements it
per tensor (merge_methods/ram.py, ``ramplus_tl``). With S, c as in ``ram`` and, for model i over
the whole tensor,
    shared_i = #{entries i changed that other models changed too}
    unique_i = #{entries only i changed}
    rho_i = shared_i / max(unique_i, epsilon);   lambda_i = 1 + r * clip(rho_i, 0, alpha)
    theta = theta_0 + sum_i lambda_i tau_i [only i changed it] + sum_{i in S} tau_i / c [several did]
The counts are of the whole tensor, so a streaming pass counts them over the row chunks first.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import MergeMethod, StatsPass, TensorJob, register
from deltawise.merge.methods.ram import EPSILON, changed, ram_combine
from deltawise.merge.params import Param


class OverlapCounts(StatsPass):
    """Per model, the changed entries that are shared with other models and those that are not."""

    label = "RAM+ overlap counts"

    def __init__(self) -> None:
        self.shared = None
        self.unique = None

    def update(self, job: TensorJob) -> None:
        _, masks, counts = changed(job)
        shared = torch.stack([(m & (counts > 1)).sum() for m in masks]).cpu()
        unique = torch.stack([(m & (counts == 1)).sum() for m in masks]).cpu()
        self.shared = shared if self.shared is None else self.shared + shared
        self.unique = unique if self.unique is None else self.unique + unique


def unique_scales(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """lambda_i, computed with mergekit's float32 operations (int64 counts in)."""
    rho = shared / unique.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


@register
class RamPlusTL(MergeMethod):
    name = "ramplus_tl"
    summary = "RAM with each model's unique entries scaled by 1 + r * min(shared/unique, alpha), per tensor"
    reference = "https://arxiv.org/abs/2601.13572"
    params = (
        Param("r", float, 0.1, help="how much a model's overlap ratio scales up its unique entries"),
        Param("alpha", float, 0.2, low=0.0, help="upper clip of the overlap ratio"),
        EPSILON,
    )

    def tensor_passes(self, params, model_params, numel, stats):
        counts = OverlapCounts()
        yield counts
        stats["unique_scales"] = unique_scales(counts.shared, counts.unique, params["r"], params["alpha"], params["epsilon"])

    def merge(self, job: TensorJob) -> torch.Tensor:
        scales = job.stats["unique_scales"].to(job.models[0].device)
        return ram_combine(job, [scales[i] for i in range(len(job.models))])
