"""Whole task-vector matrices, for the methods that decompose each 2-D task vector (TSV-M, Iso-C,
Iso-CTS): an SVD needs the whole matrix, not row chunks.

``WholeDeltas`` is a per-tensor pass that copies each chunk's task vectors into full float32
(float64 when stored so) matrices; the method then computes the merged task vector once and
``add_rows`` hands each chunk its rows. ``WholeMatrixMethod`` is that shape, theta_0 + lambda * tau_m, for a
method that only says how it merges the matrices. Memory bound: for the 2-D tensors being merged at one time
(one per merge thread), the T task-vector matrices plus the method's SVD work (a few more
matrices of the same size); 1-D tensors are merged in row chunks as usual.
"""

from __future__ import annotations

from typing import Optional

import torch

from deltawise.merge.base import MergeMethod, StatsPass, TensorJob


class WholeDeltas(StatsPass):
    """tau_i = theta_i - theta_0 of one 2-D tensor, assembled from its row chunks (nothing for other shapes)."""

    label = "task-vector matrices"

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.matrices: Optional[list[torch.Tensor]] = None

    def update(self, job: TensorJob) -> None:
        if job.models[0].dim() != 2:
            return
        deltas = job.deltas()
        if self.matrices is None:
            columns = deltas[0].shape[1]
            self.matrices = [torch.empty(self.numel // columns, columns, dtype=d.dtype, device=d.device) for d in deltas]
        for whole, rows in zip(self.matrices, deltas):
            whole[job.row_start : job.row_start + rows.shape[0]].copy_(rows)


def mean_of_deltas(job: TensorJob) -> torch.Tensor:
    """The running mean of the task vectors, in the order FusionBench accumulates it (for tensors
    that are not decomposed: biases, norms)."""
    deltas = job.deltas(scratch=True)
    mean = deltas[0]
    for i, tau in enumerate(deltas[1:], start=2):
        mean.add_((tau - mean) / i)
    return mean


def add_rows(job: TensorJob, merged: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """base + scale * (the merged task vector's rows for this chunk, or the mean task vector for
    tensors that were not decomposed)."""
    if merged is None:
        tau = mean_of_deltas(job)
    else:
        rows = job.models[0].shape[0]
        tau = merged[job.row_start : job.row_start + rows].to(job.base.dtype)
    return job.base + scale * tau if scale != 1 else job.base + tau


def orthonormal_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor of the polar decomposition, U V^T from matrix = U S V^T: the closest
    matrix with orthonormal columns (rows when wider), used to decorrelate stacked singular vectors."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


class WholeMatrixMethod(MergeMethod):
    """theta_0 + lambda * tau_m, where tau_m is ``merge_matrices`` of each 2-D tensor's whole task-vector matrices
    and the mean task vector of other tensors; the method declares a ``lambda`` parameter."""

    def merge_matrices(self, deltas: list[torch.Tensor], params: dict) -> torch.Tensor:
        raise NotImplementedError

    def tensor_passes(self, params, model_params, numel, stats):
        whole = WholeDeltas(numel)
        yield whole
        stats["merged"] = None if whole.matrices is None else self.merge_matrices(whole.matrices, params)

    def merge(self, job: TensorJob) -> torch.Tensor:
        return add_rows(job, job.stats.get("merged"), float(job.params["lambda"]))
