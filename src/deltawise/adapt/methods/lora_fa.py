"""LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning", arXiv 2308.03303; revised optimizer), via PEFT's ``create_lorafa_optimizer``.

LoRA with A frozen at its random init; only B trains, with the gradient correction
g_B ← (1/s²)·g_B·(AAᵀ + δI)^{-1} before AdamW, s = α/r. Trainable per matrix: r·out.
Parameters as LoRA (r = 8, α = r; PEFT's example uses r = 16, α = 32).

Sharded (FSDP2): A and B are DTensors holding a row block each. (AAᵀ)⁻¹ needs the whole A, so each step
every process gathers every A (r×in, in the optimizer's order) and runs PEFT's step with it; each row of g_B is
projected on its own, so the rows of B a process holds take the same step as in one process.
"""

from __future__ import annotations

from functools import cache

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
        peft_optimizer = create_lorafa_optimizer(model, r=self.values["rank"], lora_alpha=self.alpha(), lr=lr,
                                                 weight_decay=weight_decay, use_rslora=self.values["rslora"])
        # the same groups (lr, betas, weight decay, scaling per parameter) and PEFT's defaults (eps, bias correction)
        return _whole_a_optimizer()(peft_optimizer.param_groups)

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        model = super().prepare(model, task, seed)
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)  # frozen from the start, so counts and saves agree with the optimizer
        return model


@cache
def _whole_a_optimizer() -> type[torch.optim.Optimizer]:
    """PEFT's ``LoraFAOptimizer`` whose step sees every sharded lora_A whole (PEFT imported on first use)."""
    from peft.optimizers.lorafa import LoraFAOptimizer

    from deltawise.adapt.sharding import whole

    class WholeALoraFA(LoraFAOptimizer):
        """PEFT's step with each sharded A replaced, for the step, by its gathered whole (every process gathers
        the same A's in the same order); B, its gradient and its Adam moments stay sharded, and the r×r inverse,
        a plain tensor, counts as replicated on every process (``implicit_replication``). Unsharded: PEFT's step."""

        @torch.no_grad()
        def step(self, closure=None):
            from torch.distributed.tensor import DTensor
            from torch.distributed.tensor.experimental import implicit_replication

            held = []
            for group in self.param_groups:
                params = group["params"]
                for i, (p, name) in enumerate(zip(params, group["names"])):
                    if "lora_A" in name and isinstance(p, DTensor):
                        held.append((params, i, p))
                        params[i] = whole(p)
            if not held:
                return super().step(closure)
            try:
                with implicit_replication():
                    return super().step(closure)
            finally:
                for params, i, p in held:
                    params[i] = p

    return WholeALoraFA
