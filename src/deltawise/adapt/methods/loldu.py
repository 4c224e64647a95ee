"""LoLDU: Low-Rank Adaptation via Lower-Diag-Upper decomposition (Shi et al., 2024, arXiv 2410.13618).

Per target W (float32): W = P L U (partial pivoting); D = diag(U), U_unit = U / D[:, None];
keep L_r = L[:, :r], U_r = U_unit[:r], z = D[:r] (trainable, init D[:r]); frozen residual
W_res = W − s·P L_r diag(z) U_r; forward h = W_res x + s·(P L_r) diag(z) U_r x (= W x at init).
s = α/r with α = 1 by default (the official ``from_linear``). P L_r is stored as one out×r matrix
(no dense out×out permutation). Only z trains: r parameters per matrix. Zero pivots get a tiny
epsilon. Saved delta: s·(P L_r) diag(z − z₀) U_r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import RANK, TARGETS
from deltawise.adapt.methods.own_common import AdaptedLinear, OwnAdapterMethod
from deltawise.params import Param


class LoLDULinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, r: int, scale: float):
        super().__init__(base)
        w = base.weight.detach().float()
        r = min(r, min(w.shape))
        p, lower, upper = torch.linalg.lu(w)
        d = torch.diagonal(upper).clone()
        d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)  # zero pivot: avoid dividing by 0
        u_unit = upper / d[:, None]
        self.scale = scale
        self.register_buffer("pl", (p @ lower[:, :r]).contiguous())
        self.register_buffer("u_r", u_unit[:r].contiguous())
        self.z = nn.Parameter(d[:r].clone())
        self.register_buffer("z0", d[:r].clone())
        self.register_buffer("w_res", w - scale * (self.pl * self.z0) @ self.u_r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w_res, self.bias) + self.scale * F.linear(F.linear(x, self.u_r) * self.z, self.pl)

    def delta_factors(self):
        return self.scale * self.pl * (self.z - self.z0), self.u_r


@register
class LoLDU(OwnAdapterMethod):
    name = "loldu"
    summary = "only the r leading pivots z of each target's LU factors train (r parameters per matrix)"
    params = (
        RANK,
        Param("alpha", float, 1.0, low=0.0, low_open=True, help="scale numerator, s = alpha/rank (official from_linear: 1)"),
        TARGETS,
    )

    def wrap(self, linear: nn.Linear, seed: int) -> LoLDULinear:
        r = self.values["rank"]
        return LoLDULinear(linear, r, self.values["alpha"] / r)
