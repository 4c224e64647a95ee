"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation (Cao, 2024, arXiv 2409.00055).

Per target W (float32): W = U S Vᵀ; trainable principal part U_p = U[:, :r], S_p = S[:r],
V_pᵀ = Vᵀ[:r]; frozen residual W_r = W − s·U_p diag(S_p) V_pᵀ; forward h = W_r x + s·U_p diag(S_p) V_pᵀ x
(= W x at init). s = α/r, or 1 when α is not given (the official default).
Regularizer L_o = (1/N_mat) Σ_layers (‖V_pᵀV_p − I‖_F + ‖U_pᵀU_p − I‖_F), N_mat = number of U and V
matrices; its gradient, scaled by γ/η (η = peak lr), is added after gradient clipping and before the
optimizer step, as in the official trainer. Defaults: r = 8 here (paper scripts 128), γ = 4e-4.
Trainable per matrix: r·(out + in) + r. Saved delta: s(U_p S_p V_pᵀ − U_0 S_0 V_0ᵀ), rank ≤ 2r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import RANK, TARGETS
from deltawise.adapt.methods.own_common import AdaptedLinear, OwnAdapterMethod
from deltawise.adapt.sharding import whole
from deltawise.params import Param


class SORSALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, r: int, scale: float):
        super().__init__(base)
        w = base.weight.detach().float()
        r = min(r, min(w.shape))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.scale = scale
        # contiguous: the SVD's U is column-major, and FSDP shards only contiguous parameters
        self.U = nn.Parameter(u[:, :r].contiguous())
        self.S = nn.Parameter(s[:r].clone())
        self.Vh = nn.Parameter(vh[:r].contiguous())
        self.register_buffer("w_res", w - scale * (self.U.detach() * self.S.detach()) @ self.Vh.detach())
        self.register_buffer("U0", self.U.detach().clone())
        self.register_buffer("S0", self.S.detach().clone())
        self.register_buffer("Vh0", self.Vh.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w_res, self.bias) + self.scale * F.linear(F.linear(x, self.Vh) * self.S, self.U)

    def delta_factors(self):
        left = torch.cat([self.scale * self.U * self.S, -self.scale * self.U0 * self.S0], dim=1)
        return left, torch.cat([self.Vh, self.Vh0], dim=0)

    def orthonormal_error(self) -> torch.Tensor:
        # sharded (FSDP): U and Vh are gathered whole (every rank, modules in the same order) and each rank's
        # shard receives the rows of the gradient it holds
        u, vh = whole(self.U), whole(self.Vh)
        eye = torch.eye(vh.shape[0], device=vh.device)
        return torch.linalg.matrix_norm(vh @ vh.T - eye) + torch.linalg.matrix_norm(u.T @ u - eye)


@register
class SORSA(OwnAdapterMethod):
    name = "sorsa"
    summary = "train the top-r singular vectors and values of each target, with an orthonormality regularizer"
    params = (
        RANK,
        Param("alpha", float, None, low=0.0, low_open=True,
              help="scale numerator, s = alpha/rank; default: none given, s = 1 (the official default)"),
        Param("gamma", float, 4e-4, low=0.0,
              help="γ, weight of the orthonormal regularizer L_o, whose gradient is added as γ/lr (official 4e-4)"),
        TARGETS,
    )

    def wrap(self, linear: nn.Linear, seed: int) -> SORSALinear:
        r, alpha = self.values["rank"], self.values["alpha"]
        scale = 1.0 if alpha is None else alpha / r
        return SORSALinear(linear, r, scale)

    def orthonormal_loss(self) -> torch.Tensor:
        return sum(m.orthonormal_error() for m in self.modules.values()) / (2 * len(self.modules))

    def before_optimizer_step(self, model: nn.Module, peak_lr: float) -> None:
        with torch.enable_grad():
            (self.values["gamma"] / peak_lr * self.orthonormal_loss()).backward()
