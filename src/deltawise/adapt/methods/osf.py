"""OSF, orthogonal subspace fine-tuning (Nayak et al., 2025, "Sculpting Subspaces: Constrained Full Fine-Tuning in
LLMs for Continual Learning", arXiv 2504.07097), via PEFT (``OSFConfig``).

Each target matrix is split by its SVD into W = U_h S_h V_hᵀ + U_l S_l V_lᵀ: the top ``preserved`` share of
the singular directions (h) is frozen, the rest (l) trains, with the gradients of U_l and V_l projected
orthogonal to U_h and V_h so the update stays out of the directions that carry most of what the
model knows. The output is a deltawise delta folder: per target matrix the dense change
ΔW = U_l S_l V_lᵀ − (its value at init), PEFT's ``get_delta_weight``. Trainable per matrix:
(in + out + 1)·(min(in, out) − k), k the preserved rank. Causal LMs only (PEFT's OSF does not train a new
classification head).
Sharded (FSDP2, adapt/sharding.py): FSDP replaces every parameter by a sharded copy, so PEFT's gradient hooks
(registered on the original U_l and V_l) no longer fire; after each backward pass (before clipping, where
they would have acted) every rank gathers each sharded gradient of U_l and V_l whole, projects it as PEFT's
hook does, and keeps its own rows. The delta is computed on the CPU (the gathered factors are CPU copies
while the frozen initial factors stay on the training device).
"""

from __future__ import annotations

import torch
from torch import nn

from deltawise.adapt.methods.base import DeltaMethod, MethodError, register
from deltawise.adapt.sharding import assign_rows, whole
from deltawise.adapt.methods.common import TARGETS
from deltawise.params import Param

PREFIX = "base_model.model."
ADAPTER = "default"


@register
class OSF(DeltaMethod):
    name = "osf"
    summary = "full-rank update confined to the complement of each matrix's top singular subspace, which stays frozen (PEFT)"
    params = (
        Param("preserved", float, 0.5, low=0.0, high=1.0, low_open=True, high_open=True,
              help="share of each matrix's singular directions kept frozen, the largest first (PEFT's default 0.5)"),
        TARGETS,
    )

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        from peft import OSFConfig, get_peft_model

        if task != "causal_lm":
            raise MethodError("osf trains causal language models; PEFT's OSF does not train a classification head")
        self.heads = []
        config = OSFConfig(effective_rank=self.values["preserved"], target_modules=self.values["targets"])
        return get_peft_model(model, config)

    def after_backward(self, model: nn.Module) -> None:
        from torch.distributed.tensor import DTensor

        for _, layer in _osf_layers(model):
            params = layer.osf_svd_params[ADAPTER]
            for which in ("U_low", "V_low"):
                grad = params[which].grad
                if isinstance(grad, DTensor):  # sharded: PEFT's hook never saw this gradient
                    assign_rows(grad, _project(layer, which, whole(grad)))  # every rank, layers in the same order

    def deltas(self, model: nn.Module):
        from deltawise.delta.dense import DenseDelta

        found = {}
        for name, layer in _osf_layers(model):
            params = layer.osf_svd_params[ADAPTER]
            u, s, v = (params[k].detach().float().cpu() for k in ("U_low", "S_low", "V_low"))
            u0, s0, v0 = (getattr(layer, f"_osf_{k}_low_init")[ADAPTER].float().cpu() for k in ("U", "S", "V"))
            # PEFT's get_delta_weight (U_l S_l V_l − its value at init), on the CPU
            found[name.removeprefix(PREFIX) + ".weight"] = DenseDelta(torch.mm(u * s.unsqueeze(0), v)
                                                                      - torch.mm(u0 * s0.unsqueeze(0), v0))
        if not found:
            raise MethodError("osf adapted no matrix: check -p targets")
        return found


def _osf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "osf_svd_params") and ADAPTER in module.osf_svd_params]


@torch.no_grad()
def _project(layer: nn.Module, which: str, grad: torch.Tensor) -> torch.Tensor:
    """PEFT's gradient hook (peft/tuners/osf/layer.py ``_attach_hooks``) on a whole gradient: U_l's columns and
    V_l's rows are kept orthogonal to the frozen top subspace (through U_h / V_h, or the initial U_l / V_l where
    they span its complement exactly)."""
    if which == "U_low":
        if ADAPTER in layer._osf_U_high:
            high = layer._osf_U_high[ADAPTER].to(grad.device)
            return grad - high @ (high.transpose(0, 1) @ grad)
        low = layer._osf_U_low_init[ADAPTER].to(grad.device)
        return low @ (low.transpose(0, 1) @ grad)
    if ADAPTER in layer._osf_V_high:
        high = layer._osf_V_high[ADAPTER].to(grad.device)
        return grad - (grad @ high.transpose(0, 1)) @ high
    low = layer._osf_V_low_init[ADAPTER].to(grad.device)
    return (grad @ low.transpose(0, 1)) @ low
