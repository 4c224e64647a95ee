"""Passthrough: one model's tensors, unchanged or scaled (the building block of frankenmerges).

As mergekit 0.1.5 (merge_methods/passthrough.py): exactly one input per tensor (a base_model not
listed under models counts as a second one, which is refused), returned as it is, or times
``scale`` when set: theta = scale * theta_1. Stacking layers of several models (``slices:``)
is the recipe format's business, not the method's.
"""

from __future__ import annotations

from typing import Any

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.params import Param


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "the one input model's tensors, optionally scaled"
    reference = "https://github.com/arcee-ai/mergekit"
    base_policy = "input"
    min_models = 1
    max_models = 1
    params = (
        Param("scale", float, None, scope="model", help="factor on the model's tensors (default: none, copied as they are)"),
    )
    propagates_nonfinite = True  # a copy or a scaling of each entry

    def copies(self, params: dict[str, Any], model_params: list[dict[str, Any]]) -> bool:
        return model_params[0]["scale"] is None

    def merge(self, job: TensorJob) -> torch.Tensor:
        scale = job.model_params[0]["scale"]
        model = job.models[0]
        return model if scale is None else torch.mul(model, scale, out=job.scratch("scaled", model))
