"""Multi-SLERP: barycentric interpolation of several models on the hypersphere.

Goddard 2025, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as
mergekit 0.1.5 implements it (merge_methods/multislerp.py). With x_i the flattened models (task
vectors theta_i - theta_0 when a base_model is given), weights w_i (divided by their sum when
normalize_weights), n_i = ||x_i|| and u_i = x_i / (n_i + eps):
    m = sum_i w_i u_i,   m_hat = m / ||m||
    tangent = sum_i w_i (u_i - <u_i, m_hat> m_hat)       (the tangent space at m_hat)
    result  = (sum_i w_i n_i) * exp_{m_hat}(tangent)      (+ theta_0 with a base)
The tangent is exactly zero (sum_i w_i <u_i, m_hat> = <m, m_hat> = ||m||), so the result is the
weighted Euclidean mean of the unit vectors, renormalised and scaled by the weighted norm:
    result = (sum_i w_i n_i / ||m||) * sum_i w_i x_i / (n_i + eps)
which is what this computes, from the Gram matrix of the x_i (``gram.py``); mergekit's rounding
of the zero tangent changes its output by less than 1e-6. ||m|| < eps (antipodal inputs with
balancing weights) falls back, for two models, to w_0 x_0 + w_1 x_1, and is an error otherwise.
One model is returned as it is.
"""

from __future__ import annotations

from typing import Sequence

import torch

from deltawise.errors import DeltawiseError
from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.methods.common import WEIGHT
from deltawise.merge.methods.gram import Gram, combine, norm_of
from deltawise.merge.params import Param


def multislerp_coefficients(gram: torch.Tensor, weights: Sequence[float], normalize_weights: bool, eps: float) -> list[float]:
    """c with result = sum_i c_i x_i (see the module docstring); raises when the mean vanishes."""
    w32 = torch.tensor(list(weights), dtype=torch.float32)  # mergekit's weights are float32 tensors
    if normalize_weights:
        w32 = w32 / w32.sum()
    w = w32.double()
    norms = gram.diagonal().clamp(min=0).sqrt()
    a = w / (norms + eps)
    mean_norm = norm_of(gram, a)
    if mean_norm < eps:
        if len(w) == 2:
            return w.tolist()  # mergekit's fallback: plain weighted sum of the two
        raise DeltawiseError(
            "multislerp: the weighted mean of the unit vectors is zero (antipodal inputs whose weights "
            "balance out); use different weights"
        )
    return (a * (float((norms * w).sum()) / mean_norm)).tolist()


@register
class MultiSlerp(MergeMethod):
    name = "multislerp"
    summary = "barycentric interpolation of any number of models on the hypersphere (task vectors with a base_model)"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    base_policy = "optional"
    min_models = 1
    params = (
        WEIGHT,
        Param("normalize_weights", bool, True, help="divide the weights by their sum"),
        Param("eps", float, 1e-8, low=0.0, help="added to the norms before dividing, for numerical stability"),
    )

    def tensor_passes(self, params, model_params, numel, stats):
        if len(model_params) < 2:
            return
        gram = Gram()
        yield gram
        weights = [float(p["weight"]) for p in model_params]
        stats["coefficients"] = multislerp_coefficients(gram.matrix, weights, params["normalize_weights"], params["eps"])

    def merge(self, job: TensorJob) -> torch.Tensor:
        if len(job.models) == 1:
            return job.models[0]  # as mergekit: the model itself, even with a base_model
        return combine(job, job.stats["coefficients"])
