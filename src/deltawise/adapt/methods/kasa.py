"""KaSA: Knowledge-aware Singular-value Adaptation (Wang et al., 2024, arXiv 2412.06071).

Per target W (float32): SVD W = U Σ Vᵀ, q = min(out, in); the r smallest components are dropped:
W_world = W − U_tail Σ_tail V_tailᵀ (this *changes the output at step 0*, by design).
Adapter ΔW = s·B diag(d) A, A ∈ R^{r×in} Kaiming-uniform (a = √5), B ∈ R^{out×r} zeros, d ~ N(0, 1);
s = α/r. Loss: L_task + β·mean_layers ‖d‖² + γ·mean_layers (‖BᵀB − I_r‖_F + ‖AAᵀ − I_r‖_F)
(the paper's r×r form; the official code's AᵀA / BBᵀ form cannot reach the identity and is not used).
Defaults: r = 8, α = 16, β = 1e-4, γ = 1e-3. Trainable per matrix: r·(in + out) + r.
Saved delta relative to the original W: −U_tail Σ_tail V_tailᵀ + s·B diag(d) A (rank ≤ 2r).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import RANK, TARGETS
from deltawise.adapt.methods.own_common import AdaptedLinear, OwnAdapterMethod
from deltawise.adapt.sharding import whole
from deltawise.params import Param


class KaSALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, r: int, scale: float, seed: int):
        super().__init__(base)
        w = base.weight.detach().float()
        q = min(w.shape)
        r = min(r, q)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.register_buffer("tail_left", (u[:, q - r : q] * s[q - r : q]).contiguous())
        self.register_buffer("tail_right", vh[q - r : q].contiguous())
        self.register_buffer("w_world", w - self.tail_left @ self.tail_right)
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(w.shape[1])  # kaiming_uniform_(a=√5) on an (r, in) matrix
        self.A = nn.Parameter((torch.rand(r, w.shape[1], generator=gen) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(w.shape[0], r))
        self.d = nn.Parameter(torch.randn(r, generator=gen))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w_world, self.bias) + self.scale * F.linear(F.linear(x, self.A) * self.d, self.B)

    def delta_factors(self):
        left = torch.cat([-self.tail_left, self.scale * self.B * self.d], dim=1)
        return left, torch.cat([self.tail_right, self.A], dim=0)


@register
class KaSA(OwnAdapterMethod):
    name = "kasa"
    summary = "drop each target's r smallest singular components and train a LoRA with learned singular values d"
    params = (
        RANK,
        Param("alpha", float, 16.0, low=0.0, low_open=True, help="scale numerator, s = alpha/rank (official 16)"),
        Param("beta", float, 1e-4, low=0.0, help="β, weight of the L2 loss on the learned singular values d (official 1e-4)"),
        Param("gamma", float, 1e-3, low=0.0,
              help="γ, weight of the loss term pulling BᵀB and AAᵀ towards the identity (official 1e-3)"),
        TARGETS,
    )

    def wrap(self, linear: nn.Linear, seed: int) -> KaSALinear:
        r = self.values["rank"]
        return KaSALinear(linear, r, self.values["alpha"] / r, seed)

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        beta, gamma = self.values["beta"], self.values["gamma"]
        mods = list(self.modules.values())
        l2, l3 = 0.0, 0.0
        for m in mods:
            # sharded (FSDP): the factors are gathered whole (every rank, modules in the same order) and each
            # rank's shard receives the rows of the gradient it holds
            a, b, d = whole(m.A), whole(m.B), whole(m.d)
            eye = torch.eye(d.numel(), device=d.device)
            l2 = l2 + (d**2).sum()
            l3 = l3 + torch.linalg.matrix_norm(b.T @ b - eye) + torch.linalg.matrix_norm(a @ a.T - eye)
        return beta * (l2 / len(mods)) + gamma * l3 / len(mods)
