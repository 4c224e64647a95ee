"""LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning", arXiv 2308.03303; revised optimizer), via PEFT's ``create_lorafa_optimizer``.

LoRA with A frozen at its random init; only B trains, with the gradient correction
g_B ← (1/s²)·g_B·(AAᵀ + δI)^{-1} before AdamW, s = α/r. Trainable per matrix: r·out.
Parameters as LoRA (r = 8, α = r; PEFT's example uses r = 16, α = 32).
"""

from __future__ import annotations

import torch
from torch import nn

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import LORA_PARAMS
from deltawise.adapt.methods.lora import LoRA


@register
class LoRAFA(LoRA):
    name = "lora_fa"
    summary = "LoRA with A frozen and B's gradient projected by (AAᵀ)⁻¹/s² (PEFT's LoRA-FA optimizer)"
    params = LORA_PARAMS  # LoRA's own init=eva is not theirs

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float, max_grad_norm: float) -> torch.optim.Optimizer:
        from peft.optimizers import create_lorafa_optimizer

        # also sets requires_grad=False on every lora_A
        return create_lorafa_optimizer(model, r=self.values["rank"], lora_alpha=self.alpha(), lr=lr, weight_decay=weight_decay,
                                       use_rslora=self.values["rslora"])

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        model = super().prepare(model, task, seed)
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)  # frozen from the start, so counts and saves agree with the optimizer
        return model
