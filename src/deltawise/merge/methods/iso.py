"""Iso-C and Iso-CTS: isotropic merging. Sum the task vectors, then flatten the singular spectrum
of the sum so that every direction it spans gets the same weight (Iso-C); Iso-CTS first makes
room in that subspace for each task's own directions the common ones miss.

Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces" (arXiv 2502.04959, ICML 2025); the same computation as FusionBench's ``iso_c`` and
``iso_cts``. For each 2-D tensor with task vectors tau_1..tau_T:
  Iso-C:    sum_t tau_t = U S V^T;   tau_m = mean(S) U V^T
  Iso-CTS:  r = min(m, n); c = r - T * round((r - int(r * f)) / T) common directions (f =
            common_space_fraction), k = (r - c) / T per task;
            common: the top c singular triplets of sum_t tau_t;
            task t: the top k singular triplets of tau_t - U_c U_c^T tau_t;
            U = orth([U_1k .. U_Tk, U_c]), V likewise, S = [...];  tau_m = mean(S) U V^T
theta = theta_0 + lambda * tau_m. Other tensors (biases, norms): theta_0 + lambda * mean_t tau_t.
Every 2-D tensor is decomposed, embeddings included; lambda is tuned on validation in the paper
(1.0 is FusionBench's default). Memory: ``whole_matrix.py``.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import register
from deltawise.merge.methods.whole_matrix import WholeMatrixMethod, orthonormal_factor
from deltawise.merge.params import Param

ISO_LAMBDA = Param("lambda", float, 1.0, help="scale of the merged task vector (the paper's alpha; tune it on validation)")
COMMON_FRACTION = Param(
    "common_space_fraction", float, 0.8, low=0.0, high=1.0,
    help="share of the rank given to the common subspace of the summed task vectors (Iso-CTS)",
)


def iso_c_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C's merged task vector of one 2-D tensor."""
    total = torch.stack(deltas).sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_merge(deltas: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Iso-CTS's merged task vector of one 2-D tensor."""
    count = len(deltas)
    rank = min(deltas[0].shape)
    common = int(rank * common_fraction)
    common = rank - round((rank - common) / count) * count  # what is left divides evenly among tasks
    per_task = (rank - common) // count
    u, s, vh = torch.linalg.svd(torch.stack(deltas).sum(0), full_matrices=False)
    u_common = u[:, :common]
    u_parts, s_parts, vh_parts = [], [], []
    for tau in deltas:
        specific = tau - u_common @ (u_common.T @ tau)
        u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
        u_parts.append(u_t[:, :per_task])
        s_parts.append(s_t[:per_task])
        vh_parts.append(vh_t[:per_task])
    u_all = torch.cat([*u_parts, u_common], dim=1)
    s_all = torch.cat([*s_parts, s[:common]])
    vh_all = torch.cat([*vh_parts, vh[:common]], dim=0)
    return s_all.mean() * (orthonormal_factor(u_all) @ orthonormal_factor(vh_all))


@register
class IsoC(WholeMatrixMethod):
    name = "iso_c"
    summary = "Iso-C: sum of task vectors with its singular spectrum flattened to the mean"
    reference = "https://arxiv.org/abs/2502.04959"
    params = (ISO_LAMBDA,)

    def merge_matrices(self, deltas, params):
        return iso_c_merge(deltas)


@register
class IsoCTS(WholeMatrixMethod):
    name = "iso_cts"
    summary = "Iso-CTS: Iso-C over the common subspace plus each task's own top directions"
    reference = "https://arxiv.org/abs/2502.04959"
    min_models = 2
    params = (ISO_LAMBDA, COMMON_FRACTION)

    def merge_matrices(self, deltas, params):
        return iso_cts_merge(deltas, float(params["common_space_fraction"]))
