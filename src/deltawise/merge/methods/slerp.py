"""SLERP: spherical interpolation between the base and one other model, per tensor.

Shoemake 1985; used for LLM merging by mergekit. With u = v/||v|| over the flattened tensor,
    d = <u0, u1>;  if |d| > 0.9995: (1-t) v0 + t v1   (nearly colinear: plain lerp)
    else w = arccos d:  sin((1-t) w)/sin w * v0 + sin(t w)/sin w * v1
t = 0 returns the base, t = 1 the other model; t may be a depth gradient or filtered per tensor.
The norms and the dot product are accumulated over row chunks (in float64) before any chunk
is interpolated, so the coefficients are those of the whole tensor.
"""

from __future__ import annotations

import math

import torch

from deltawise.merge.base import MergeMethod, StatsPass, TensorJob, register
from deltawise.merge.params import Param

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class Products(StatsPass):
    """<v0,v0>, <v1,v1>, <v0,v1> of the whole tensor."""

    label = "SLERP norms"

    def __init__(self):
        self.sums = [0.0, 0.0, 0.0]

    def update(self, job: TensorJob) -> None:
        v0, v1 = job.base.double(), job.models[0].double()
        for i, value in enumerate(((v0 * v0).sum(), (v1 * v1).sum(), (v0 * v1).sum())):
            self.sums[i] += float(value)

    def coefficients(self, t: float) -> tuple[float, float]:
        n0, n1 = math.sqrt(self.sums[0]), math.sqrt(self.sums[1])
        dot = self.sums[2] / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))
        dot = max(-1.0, min(1.0, dot))
        if abs(dot) > DOT_THRESHOLD:
            return 1 - t, t
        omega = math.acos(dot)
        return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


@register
class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation between base_model (t=0) and one other model (t=1)"
    reference = "https://github.com/arcee-ai/mergekit"
    min_models = 1
    max_models = 1
    params = (Param("t", float, help="interpolation factor: 0 = base_model, 1 = the other model"),)

    def tensor_passes(self, params, model_params, numel, stats):
        products = Products()
        yield products
        stats["coefficients"] = products.coefficients(float(params["t"]))

    def merge(self, job: TensorJob) -> torch.Tensor:
        c0, c1 = job.stats["coefficients"]
        return c0 * job.base + c1 * job.models[0]
