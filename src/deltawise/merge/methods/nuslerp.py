"""NuSLERP: SLERP between two models with weights, whole-tensor, per row or per column.

Shoemake 1985 (spherical linear interpolation); the weighted, row/column-wise variant as mergekit
0.1.5 implements it (merge_methods/nuslerp.py). With weights w_0, w_1 of the two models,
    t = w_1 / (w_0 + w_1)            (0.5 when |w_0 + w_1| < 1e-6)
and v_0, v_1 the two models (their task vectors theta_k - theta_0 when a base_model is given),
each vector (the whole flattened tensor with nuslerp_flatten, the default; else each column,
along dimension 0, with nuslerp_row_wise; else each row, along the last dimension) becomes
    cos w = <v_0, v_1> / (max(||v_0||, 1e-7) max(||v_1||, 1e-7))
    (sin((1-t) w) v_0 + sin(t w) v_1) / sin w      ((1-t) v_0 + t v_1 where 1 - cos^2 w <= 1e-16)
plus theta_0 with a base. t = 0 gives the first model, t = 1 the second. Norms and dot products
of whole tensors and of columns are accumulated over row chunks (float64) before any chunk is
interpolated; rows are whole in every chunk. mergekit computes them in float32: the results agree
to rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from deltawise.merge.base import MergeMethod, StatsPass, TensorJob, register
from deltawise.merge.methods.common import WEIGHT
from deltawise.merge.params import Param

NORM_FLOOR = 1e-7
EPS = 1e-8


def interpolation_t(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _vectors(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor]:
    v0, v1 = job.models if job.base is None else job.deltas(scratch=True)
    return v0, v1


def _products(v0: torch.Tensor, v1: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """[<v0,v0>, <v1,v1>, <v0,v1>] in float64, over ``dim`` (None: everything)."""
    a, b = v0.double(), v1.double()
    if dim is None:
        return torch.stack(((a * a).sum(), (b * b).sum(), (a * b).sum()))
    return torch.stack(((a * a).sum(dim, keepdim=True), (b * b).sum(dim, keepdim=True), (a * b).sum(dim, keepdim=True)))


class Products(StatsPass):
    """The products of the whole tensor (``dim`` None) or of each column (``dim`` 0)."""

    label = "NuSLERP norms"

    def __init__(self, dim: Optional[int]):
        self.dim = dim
        self.sums: Optional[torch.Tensor] = None

    def update(self, job: TensorJob) -> None:
        products = _products(*_vectors(job), self.dim).cpu()
        self.sums = products if self.sums is None else self.sums + products


def coefficients(sums: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP coefficients (c_0, c_1) for every vector whose products ``sums`` holds (float64)."""
    n0 = sums[0].clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    n1 = sums[1].clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    cos = (sums[2] / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(omega)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * omega) / sin)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * omega) / sin)
    return c0, c1


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"
    summary = "weighted SLERP of two models (task vectors with a base_model), per tensor, row or column"
    reference = "https://github.com/arcee-ai/mergekit"
    base_policy = "optional"
    min_models = 2
    max_models = 2
    params = (
        WEIGHT,
        Param("nuslerp_row_wise", bool, False, help="interpolate each column (vectors along dimension 0) instead of each row"),
        Param("nuslerp_flatten", bool, True, help="interpolate the whole flattened tensor (overrides nuslerp_row_wise)"),
    )

    @staticmethod
    def _dim(params) -> Optional[int]:
        """The dimension summed over by a whole-tensor pass (None: all), or -1: per row, no pass."""
        if params["nuslerp_flatten"]:
            return None
        return 0 if params["nuslerp_row_wise"] else -1

    def tensor_passes(self, params, model_params, numel, stats):
        dim = self._dim(params)
        if dim == -1:
            return
        products = Products(dim)
        yield products
        stats["products"] = products.sums

    def merge(self, job: TensorJob) -> torch.Tensor:
        t = interpolation_t([float(p["weight"]) for p in job.model_params])
        v0, v1 = _vectors(job)
        sums = job.stats["products"] if self._dim(job.params) != -1 else _products(v0, v1, -1)
        c0, c1 = (c.to(device=v0.device, dtype=v0.dtype) for c in coefficients(sums.to(v0.device), t))
        out = torch.mul(v0, c0, out=job.scratch("nuslerp", v0))
        out.addcmul_(v1, c1)
        if job.base is not None:
            out.add_(job.base)
        return out
