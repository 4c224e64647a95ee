"""NearSwap: take the other model's value where it is close to the base, keep the base where the
two differ by a lot.

alchemonaut, "QuartetAnemoi-70B-t0.0001" (model card, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001);
as mergekit 0.1.5 computes it (merge_methods/nearswap.py), per entry with a = base, b = the other model:
    w = clamp(t / max(|a - b|, 1e-6), 0, 1);   theta = w b + (1 - w) a
Entries within t of each other are swapped to b entirely (w = 1); farther ones move towards b
by t in absolute terms. t = 0 returns the base. Elementwise: no statistics pass.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.params import Param


@register
class NearSwap(MergeMethod):
    name = "nearswap"
    summary = "swap in the other model's entries that lie within t of the base"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    min_models = 1
    max_models = 1
    params = (Param("t", float, help="distance below which an entry is swapped to the other model (0: the base)"),)

    def merge(self, job: TensorJob) -> torch.Tensor:
        a, b = job.base, job.models[0]
        # written as mergekit writes it: a scalar over a tensor is a reciprocal times the scalar in
        # torch, whose rounding differs from a true division
        weight = (job.params["t"] / torch.sub(a, b).abs_().clamp_(min=1e-6)).clamp_(0, 1)
        return weight * b + (1 - weight) * a
