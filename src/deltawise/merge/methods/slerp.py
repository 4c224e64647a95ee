"""SLERP: spherical interpolation between the base and one other model, per tensor.

Shoemake 1985; used for LLM merging by mergekit. With u = v/||v|| over the flattened tensor,
    d = <u0, u1>;  if |d| > 0.9995: (1-t) v0 + t v1   (nearly colinear: plain lerp)
    else w = arccos d:  sin((1-t) w)/sin w * v0 + sin(t w)/sin w * v1
t = 0 returns the base, t = 1 the other model; t may be a depth gradient or filtered per tensor.
"""

from __future__ import annotations

import math

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.params import Param

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@register
class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation between base_model (t=0) and one other model (t=1)"
    reference = "https://github.com/arcee-ai/mergekit"
    min_models = 1
    max_models = 1
    params = (Param("t", float, help="interpolation factor: 0 = base_model, 1 = the other model"),)

    def merge(self, job: TensorJob) -> torch.Tensor:
        v0, v1 = job.base, job.models[0]
        t = float(job.params["t"])
        norm0, norm1 = float(v0.norm()), float(v1.norm())
        u0 = v0 / (norm0 if norm0 > EPS else 1.0)
        u1 = v1 / (norm1 if norm1 > EPS else 1.0)
        dot = max(-1.0, min(1.0, float((u0 * u1).sum())))
        if abs(dot) > DOT_THRESHOLD:
            return (1 - t) * v0 + t * v1
        omega = math.acos(dot)
        sin_omega = math.sin(omega)
        return (math.sin((1 - t) * omega) / sin_omega) * v0 + (math.sin(t * omega) / sin_omega) * v1
