"""Karcher mean: the weighted Riemannian centre of mass of the models on the unit hypersphere.

Karcher 1977, "Riemannian center of mass and mollifier smoothing"; for model merging as in
mergekit 0.1.5 (merge_methods/karcher.py, citing arXiv 2603.04972). Every input counts, the
base_model included (appended when not listed, as mergekit does), with equal weights
alpha_i = 1/N. With n_i = ||theta_i|| (whole flattened tensor) and u_i = theta_i / n_i, over the
inputs with n_i > tol (their alphas renormalised to a_i):
    m = normalise(sum_i a_i u_i)          (u of the first such input if that sum vanishes)
    repeat max_iter times:
        theta_i = arccos <m, u_i>;  v = sum_{i: theta_i >= tol} a_i theta_i / sin(theta_i) (u_i - <m, u_i> m)
        stop if ||v|| < tol;  m = normalise(cos(||v||) m + sin(||v||) v / ||v||)
    result = (sum_i alpha_i n_i) m
m and v stay linear combinations of the inputs, so the iteration runs on their coefficients with
the Gram matrix of the inputs (``gram.py``, float64) and each row chunk is merged once at the end:
memory is the row chunks, not whole tensors. mergekit iterates on whole float32 tensors; the two
agree to rounding (about 1e-7 relative). One input is returned as it is; all inputs of norm
<= tol give zeros.
"""

from __future__ import annotations

import math

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.methods.gram import Gram, combine, norm_of
from deltawise.merge.params import Param


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """c with Karcher mean = sum_i c_i theta_i, from the inputs' Gram matrix."""
    count = gram.shape[0]
    alphas = [1.0 / count] * count
    norms = gram.diagonal().clamp(min=0).sqrt().tolist()
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return [0.0] * count
    alpha_sum = sum(alphas[i] for i in valid)
    weight = {i: alphas[i] / alpha_sum for i in valid}

    def unit(i: int) -> torch.Tensor:
        e = torch.zeros(count, dtype=torch.float64)
        e[i] = 1.0 / norms[i]
        return e

    mean = sum(weight[i] * unit(i) for i in valid)
    mean_norm = norm_of(gram, mean)
    mean = unit(valid[0]) if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(count, dtype=torch.float64)
        for i in valid:
            dot = min(1.0, max(-1.0, float(mean @ gram @ unit(i))))
            angle = math.acos(dot)
            if angle < tol:
                continue
            tangent += weight[i] * (angle / math.sin(angle)) * (unit(i) - dot * mean)
        tangent_norm = norm_of(gram, tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm_of(gram, mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * mean).tolist()


@register
class Karcher(MergeMethod):
    name = "karcher"
    summary = "Riemannian (Karcher) mean of the models on the unit hypersphere, scaled by their mean norm"
    reference = "https://arxiv.org/abs/2603.04972"
    base_policy = "input"
    min_models = 1
    params = (
        Param("max_iter", int, 10, low=0, help="most fixed-point iterations of the mean"),
        Param("tol", float, 1e-5, low=0.0, help="stop when the tangent step is shorter; inputs of smaller norm are left out"),
    )

    def tensor_passes(self, params, model_params, numel, stats):
        if len(model_params) < 2:
            return
        gram = Gram()
        yield gram
        stats["coefficients"] = karcher_coefficients(gram.matrix, int(params["max_iter"]), float(params["tol"]))

    def merge(self, job: TensorJob) -> torch.Tensor:
        if len(job.models) == 1:
            return job.models[0]
        return combine(job, job.stats["coefficients"])
