"""OPCM: continual merging with orthogonal projection and adaptive scaling.

Tang et al. 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging" (arXiv 2501.09522), official code ``tanganke/opcm``;
docs/merging.md ("opcm"). Models arrive one at a time; the state is the merged model theta_bar,
lambda_prev and the task-vector norms. First model: theta_bar = theta_1, lambda = 1. Then:
    norms += ||tau_t||;  avg = mean(norms)                       (global L2 over merged tensors)
    2-D weights:  D = theta_bar - theta_0 = U S V^T;  r = first k with (s_0+..+s_k)/sum(s) > alpha
                  P = U^T tau_t V;  P[:r, :r] = 0  (and P_ii = 0 with zero_diagonal);  tau~ = U P V^T
                  S_W = lambda_prev * D + tau~
    other tensors: S = lambda_prev * (theta_bar - theta_0) + tau_t
    lambda_t = ||S|| / avg;  theta_bar = theta_0 + S / lambda_t;  lambda_prev = lambda_t
With orthonormal U, V the projection only needs the top singular vectors:
tau~ = tau - U_r (U_r^T tau V_r) V_r^T (minus sum_{i>=r} p_ii u_i v_i^T with zero_diagonal), so a
thin SVD suffices. D = 0 (sum s = 0) skips the projection. Which tensors are projected: the
linear weights of ``deltawise.architecture`` (2-D ``*.weight`` that are not embedding tables;
see ``is_projected``); an untied lm_head is an nn.Linear and is projected. The projection is
invariant under transposition, so GPT-2 Conv1D weights (stored in x out) are handled like Linear.
Memory: one 2-D tensor (three copies plus its SVD) at a time; everything else in row chunks.
S is written unnormalised to the new state folder, ||S|| accumulated, then rescaled in a
second streaming pass: the whole model is never held.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from deltawise.architecture import TensorRoles, architecture_for
from deltawise.io.reader import ModelReader
from deltawise.merge.base import register
from deltawise.merge.continual import STATE, ContinualMethod, ContinualState, StepIO, write_tensor
from deltawise.merge.params import Param

ALPHA = Param(
    "alpha", float, 0.5, low=0.0, low_open=True,
    help="energy threshold: the top singular directions of the merged task vector holding this share are protected",
)
ZERO_DIAGONAL = Param("zero_diagonal", bool, False,
                      help="also zero P's diagonal (the FusionBench variant; the official code does not)")
SVD_DTYPE = Param("svd_dtype", str, "float32", choices=("float32", "float64"), help="precision of the SVD")


def is_projected(name: str, shape: tuple[int, ...], roles: TensorRoles | None = None) -> bool:
    """2-D weights of linear layers; embedding tables are 2-D but not linear maps of the input."""
    return (roles or architecture_for(None)).is_linear_weight(name, shape)


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """r = argmax(cumsum(s) / sum(s) > alpha) (0 when nothing exceeds alpha, as argmax of all-false)."""
    ratio = s.double().cumsum(0) / s.double().sum()
    return int((ratio > alpha).to(torch.int8).argmax())


def project(merged_delta: torch.Tensor, tau: torch.Tensor, alpha: float, zero_diagonal: bool = False,
            svd_dtype=torch.float32) -> torch.Tensor:
    """tau~: tau without its component in the top-r x top-r singular block of merged_delta."""
    d = merged_delta.to(svd_dtype)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if float(s.sum()) == 0:  # the merged vector is zero here: nothing to protect
        return tau.clone()
    r = split_rank(s, alpha)
    t = tau.to(svd_dtype)
    out = t.clone()
    if r > 0:
        ur, vr = u[:, :r], vh[:r].T
        out -= ur @ (ur.T @ t @ vr) @ vr.T
    if zero_diagonal:
        p = ((u.T @ t) * vh).sum(dim=1)  # p_ii = u_i^T tau v_i
        out -= (u[:, r:] * p[r:]) @ vh[r:]
    return out.to(tau.dtype)


@register
class Opcm(ContinualMethod):
    name = "opcm"
    summary = ("continual merging: project each new task vector off the merged one's top singular directions, "
               "rescale to the mean norm")
    reference = "https://arxiv.org/abs/2501.09522"
    min_models = 1
    params = (STATE, ALPHA, ZERO_DIAGONAL, SVD_DTYPE)

    def fold(self, io: StepIO, state: ContinualState, target: Path) -> dict[str, Any]:
        params = state.params
        tensors = io.plan.merged
        if state.count == 0:  # theta_bar = theta_1, lambda = 1
            writer = io.writer(target)
            tau_sq = 0.0
            for t in tensors:
                for a, b in io.rows(t):
                    new = io.new(t, a, b)
                    tau_sq += float((new - io.base(t, a, b)).double().pow(2).sum())
                    writer.write(t.name, new.to("cpu"), row_start=a)
            writer.finish_empty_shards()
            return {"lambda_prev": 1.0, "norms": [math.sqrt(tau_sq)]}

        lam_prev = float(state.scalars["lambda_prev"])
        roles = architecture_for(io.plan.template.config)
        svd_dtype = getattr(torch, params["svd_dtype"])
        unnormalised = target / ".S"  # pass 1: S, inside the step folder so a crash leaves nothing behind
        writer = io.writer(unnormalised)
        s_sq = tau_sq = 0.0
        for t in tensors:
            if is_projected(t.name, t.out.shape, roles):
                base = io.base(t, 0, t.out.shape[0])
                delta = io.merged(t, 0, t.out.shape[0]).sub_(base)
                tau = io.new(t, 0, t.out.shape[0]).sub_(base)
                del base
                tau_sq += float(tau.double().pow(2).sum())
                s = delta.mul_(lam_prev).add_(project(delta, tau, params["alpha"], params["zero_diagonal"], svd_dtype))
                s_sq += float(s.double().pow(2).sum())
                writer.write(t.name, s.to("cpu"))
                continue
            for a, b in io.rows(t):
                base = io.base(t, a, b)
                tau = io.new(t, a, b).sub_(base)
                tau_sq += float(tau.double().pow(2).sum())
                s = io.merged(t, a, b).sub_(base).mul_(lam_prev).add_(tau)
                s_sq += float(s.double().pow(2).sum())
                writer.write(t.name, s.to("cpu"), row_start=a)
        writer.finish_empty_shards()

        norms = list(state.scalars["norms"]) + [math.sqrt(tau_sq)]
        average = sum(norms) / len(norms)
        s_norm = math.sqrt(s_sq)
        # S = 0 only if every task vector was zero: theta_bar = theta_0 whatever lambda is
        lam = s_norm / average if s_norm > 0 and average > 0 else lam_prev
        reader = ModelReader(unnormalised)  # pass 2: theta_bar = theta_0 + S / lambda_t
        writer = io.writer(target)
        for t in tensors:
            write_tensor(writer, t, ((a, reader.get_rows(t.name, a, b).to(io.device).div_(lam).add_(io.base(t, a, b)))
                                     for a, b in io.rows(t)))
        writer.finish_empty_shards()
        reader.close()
        shutil.rmtree(unnormalised)
        return {"lambda_prev": lam, "norms": norms}

