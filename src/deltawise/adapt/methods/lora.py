"""LoRA (Hu et al., 2021, arXiv 2106.09685), via PEFT.

ΔW = (α/r)·B A with A ∈ R^{r×in} (Kaiming-uniform), B ∈ R^{out×r} (zeros), so ΔW = 0 at init.
Trainable parameters per adapted matrix: r·(in + out). Defaults: r = 8, α = 8 (PEFT), targets q_proj, v_proj.
"""

from __future__ import annotations

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.peft_common import PeftMethod, peft_task_type


@register
class LoRA(PeftMethod):
    name = "lora"
    lora_kwargs: dict = {}

    def peft_config(self, task: str, seed: int):
        from peft import LoraConfig

        o = self.options
        r = o.get("rank", 8)
        return LoraConfig(
            r=r, lora_alpha=o.get("alpha", r), lora_dropout=o.dropout, target_modules=o.targets,
            task_type=peft_task_type(task), **self.lora_kwargs,
        )
