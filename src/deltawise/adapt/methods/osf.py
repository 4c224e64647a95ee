"""OSF, orthogonal subspace fine-tuning (Nayak et al., 2025, "Sculpting Subspaces: Constrained Full Fine-Tuning in
LLMs for Continual Learning", arXiv 2504.07097), via PEFT (``OSFConfig``).

Each target matrix is split by its SVD into W = U_h S_h V_hᵀ + U_l S_l V_lᵀ: the top ``preserved`` share of
the singular directions (h) is frozen, the rest (l) trains, with the gradients of U_l and V_l projected
orthogonal to U_h and V_h so the update stays out of the directions that carry most of what the
model knows. The output is a deltawise delta folder: per target matrix the dense change
ΔW = U_l S_l V_lᵀ − (its value at init), PEFT's ``get_delta_weight``. Trainable per matrix:
(in + out + 1)·(min(in, out) − k), k the preserved rank. Causal LMs only (PEFT's OSF does not train a new
classification head).
"""

from __future__ import annotations

from torch import nn

from deltawise.adapt.methods.base import DeltaMethod, MethodError, register
from deltawise.adapt.methods.common import TARGETS
from deltawise.params import Param

PREFIX = "base_model.model."


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

    def deltas(self, model: nn.Module):
        from deltawise.delta.dense import DenseDelta

        found = {}
        for name, module in model.named_modules():
            if hasattr(module, "osf_svd_params") and "default" in module.osf_svd_params:
                base_name = name.removeprefix(PREFIX) + ".weight"
                found[base_name] = DenseDelta(module.get_delta_weight("default").detach().float().cpu().clone())
        if not found:
            raise MethodError("osf adapted no matrix: check -p targets")
        return found
