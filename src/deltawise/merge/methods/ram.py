"""RAM: Reinforced Agent Merging, averaging task vectors only where several models changed a weight.

"Reinforced Agent Merging" (arXiv 2601.13572), as mergekit 0.1.5 implements it
(merge_methods/ram.py). Per entry, with tau_i = theta_i - theta_0 and the models that changed it
    S = {i : |tau_i| > epsilon},   c = |S|
    theta = theta_0 + sum_{i in S} tau_i / max(c, 1)
so an entry that one model changed keeps that model's change whole (where an average would
divide it by the number of models), and entries changed by several are averaged over those only.
Entry-wise: every row chunk is merged on its own.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.params import Param

EPSILON = Param("epsilon", float, 1e-5, low=0.0, help="a task-vector entry counts as changed when its magnitude exceeds this")


def changed(job: TensorJob) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Task vectors, their changed-entry masks and the number of models changing each entry."""
    deltas = job.deltas(scratch=True)
    masks = [d.abs() > job.params["epsilon"] for d in deltas]
    counts = torch.stack(masks).sum(0)
    return deltas, masks, counts


def ram_combine(job: TensorJob, unique_scale: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """theta_0 + sum_i (tau_i|S where one model changed it, times unique_scale[i]) + (tau_i|S / c where several did).

    The operations and their order are mergekit's, so float32 results are bit-identical."""
    deltas, masks, counts = changed(job)
    overlap, unique = counts > 1, counts == 1
    divisor = counts.clamp(min=1)
    merged = torch.zeros_like(deltas[0])
    for i, (delta, mask) in enumerate(zip(deltas, masks)):
        kept = delta * mask
        own = kept * unique if unique_scale is None else kept * unique * unique_scale[i]
        merged += own + kept * overlap / divisor
    return job.base + merged


@register
class Ram(MergeMethod):
    name = "ram"
    summary = "task vectors kept whole where one model changed an entry, averaged where several did"
    reference = "https://arxiv.org/abs/2601.13572"
    params = (EPSILON,)

    def merge(self, job: TensorJob) -> torch.Tensor:
        return ram_combine(job)
