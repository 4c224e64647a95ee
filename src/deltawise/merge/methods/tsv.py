"""TSV-M (Task Singular Vectors: Merge): keep each task's top singular directions, decorrelate
the stacked directions, then sum.

Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging"
(arXiv 2412.00081, CVPR 2025); the same computation as FusionBench's
``compute_and_sum_svd_mem_reduction``. For each 2-D tensor, with T task vectors and
k = floor(min(m, n) / T):
    tau_t = U_t S_t V_t^T  (thin SVD);  keep U_t[:, :k], S_t[:k], V_t[:, :k]
    U = [U_1k | ... | U_Tk | 0],  S = [S_1k, ..., S_Tk, 0],  V likewise   (min(m, n) columns)
    U_perp = orth(U), V_perp = orth(V)   (orth(X) = P Q^T from X = P Sigma Q^T: whitening)
    tau_m = U_perp diag(S) V_perp^T;    theta = theta_0 + lambda * tau_m
Other tensors (biases, norms): theta_0 + lambda * mean_t tau_t, as FusionBench does.
Every 2-D tensor is decomposed, embeddings included (the paper's ViTs have few); the SVD runs in
float32 (float64 inputs stay float64). Memory: ``whole_matrix.py``.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import register
from deltawise.merge.methods.whole_matrix import WholeMatrixMethod, orthonormal_factor
from deltawise.merge.params import Param

TSV_LAMBDA = Param("lambda", float, 1.0, help="scale of the merged task vector (the paper's alpha; 1.0 as its default)")


def tsv_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The TSV-M merged task vector of one 2-D tensor from its T task vectors."""
    count = len(deltas)
    first = deltas[0]
    rank = min(first.shape)
    kept = int(rank * (1 / count))  # FusionBench's int(s.shape[0] * sv_reduction)
    u_all = first.new_zeros(first.shape[0], rank)
    s_all = first.new_zeros(rank)
    vh_all = first.new_zeros(rank, first.shape[1])
    for i, tau in enumerate(deltas):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        block = slice(i * kept, (i + 1) * kept)
        u_all[:, block], s_all[block], vh_all[block, :] = u[:, :kept], s[:kept], vh[:kept, :]
    return torch.linalg.multi_dot((orthonormal_factor(u_all), torch.diag(s_all), orthonormal_factor(vh_all)))


@register
class TaskSingularVectors(WholeMatrixMethod):
    name = "tsv"
    summary = "TSV-M: each task's top singular directions, decorrelated (whitened) and summed"
    reference = "https://arxiv.org/abs/2412.00081"
    min_models = 2
    params = (TSV_LAMBDA,)

    def merge_matrices(self, deltas, params):
        return tsv_merge(deltas)
