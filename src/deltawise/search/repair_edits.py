"""The cheap weight-space edits ``deltawise repair`` searches over, applied to a model in memory.

A delta ``Δ = θ_ft − θ_base`` is edited tensor by tensor into

    θ(p)[n] = θ_base[n] + scale · g_group(n) · (Δ[n] − intruders · P_I(n) Δ[n])

- ``scale``: one global factor (WiSE-FT's interpolation, Wortsman et al. 2022, arXiv 2109.01903).
- ``intruders`` in [0, 1]: how much of the delta's component along the fine-tuned matrix's intruder
  singular directions is removed. ``P_I(n) = U_I U_Iᵀ`` projects onto the intruders of matrix ``n``:
  the top-k left singular vectors of ``W_ft = W_base + Δ`` whose largest |cos| with every singular
  vector of ``W_base`` is below eps (Shuttleworth et al. 2024, arXiv 2410.21228; found by
  ``analyze/intruders.py``, the code ``deltawise analyze`` reports them with). At 1 the repaired
  matrix agrees with the base along each intruder direction (``u_jᵀ W' = u_jᵀ W_base``) and is
  unchanged elsewhere. PEFT's ``reduce_intruder_dimension`` instead scales the merged matrix's whole
  singular component ``s_j u_j v_jᵀ``; removing the delta's part only keeps whatever the base
  itself had along ``u_j``.
- ``g_group`` in [0, 1]: one factor per tensor group, from ``architecture.py``'s roles: ``embeddings``
  (token and position tables, the LM head), ``attention_early`` / ``attention_late`` and
  ``mlp_early`` / ``mlp_late`` (a layer is early when its index is below half the layer count;
  a bias goes with its weight), and ``other`` (norms, heads, anything else).

Only the tensors the delta changes are kept (three copies: base, delta, intruder component), so a
point is applied by rewriting those parameters in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from deltawise.analyze.intruders import intruder_directions, is_analysed_matrix
from deltawise.architecture import EMBEDDING_ROLES, Role, TensorRoles, architecture_for
from deltawise.errors import InputError

GROUPS = ("embeddings", "attention_early", "attention_late", "mlp_early", "mlp_late", "other")
SCALE, INTRUDERS = "scale", "intruders"


def tensor_group(name: str, roles: TensorRoles, num_layers: int | None) -> str:
    """The group of a parameter (see the module docstring)."""
    role = roles.module_role(name)
    if role in EMBEDDING_ROLES or role == Role.LM_HEAD:
        return "embeddings"
    if role in (Role.ATTENTION, Role.MLP):
        index = roles.layer_index(name)
        if index is None or not num_layers:
            return "other"
        return f"{role.value}_{'early' if index < num_layers / 2 else 'late'}"
    return "other"


@dataclass
class DeltaEdits:
    """A model's changed parameters as base + delta, and the edits of the module docstring."""

    parameters: dict[str, torch.nn.Parameter]  # the working model's parameters the delta changes (rewritten in place)
    base: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    groups: dict[str, str]
    intruder_part: dict[str, torch.Tensor] = field(default_factory=dict)  # P_I Δ, for matrices with intruders
    intruder_counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def between(cls, working: torch.nn.Module, fine_tuned: torch.nn.Module, *, intruder_k: int = 10,
                intruder_eps: float = 0.5) -> "DeltaEdits":
        """``working`` holds the base's weights (it is the model the points are applied to); ``fine_tuned`` is
        base + delta. Parameters are matched by name; tied ones appear once (``named_parameters``)."""
        roles = architecture_for(working.config)
        ft = dict(fine_tuned.named_parameters())
        mine = dict(working.named_parameters())
        if set(ft) != set(mine) or any(ft[n].shape != p.shape for n, p in mine.items()):
            raise InputError("the delta's model and the base do not have the same parameters (names and shapes); "
                             "repair needs a delta of this base")
        num_layers = roles.num_layers(mine)
        edits = cls({}, {}, {}, {})
        with torch.no_grad():
            for name, param in mine.items():
                if not param.is_floating_point():
                    continue
                delta = ft[name].detach().to(param.dtype) - param.detach()
                if not torch.any(delta != 0):
                    continue
                edits.parameters[name] = param
                edits.base[name] = param.detach().clone()
                edits.delta[name] = delta
                edits.groups[name] = tensor_group(name, roles, num_layers)
                if is_analysed_matrix(name, tuple(param.shape), roles):
                    found = intruder_directions(edits.base[name].double(), ft[name].detach().double(), k=intruder_k,
                                                eps=intruder_eps)
                    if found.shape[1]:
                        edits.intruder_counts[name] = found.shape[1]
                        edits.intruder_part[name] = (found @ (found.T @ delta.double())).to(delta.dtype)
        if not edits.delta:
            raise InputError("the delta changes no parameter of the base: there is nothing to repair")
        return edits

    def present_groups(self) -> list[str]:
        return [g for g in GROUPS if g in self.groups.values()]

    def identity(self) -> dict[str, Any]:
        """The point that leaves the delta as it is."""
        return {SCALE: 1.0, INTRUDERS: 0.0, **{g: 1.0 for g in self.present_groups()}}

    def tensor(self, name: str, point: Mapping[str, Any]) -> torch.Tensor:
        delta = self.delta[name]
        amount = float(point.get(INTRUDERS, 0.0))
        if amount and name in self.intruder_part:
            delta = delta - amount * self.intruder_part[name]
        factor = float(point.get(SCALE, 1.0)) * float(point.get(self.groups[name], 1.0))
        return self.base[name] + factor * delta

    @torch.no_grad()
    def apply(self, point: Mapping[str, Any]) -> None:
        """Rewrite the working model's changed parameters to the point's weights."""
        for name, param in self.parameters.items():
            param.copy_(self.tensor(name, point))
