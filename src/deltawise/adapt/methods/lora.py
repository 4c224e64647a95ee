"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685), via PEFT.

ΔW = (α/r)·B A with A ∈ R^{r×in} (Kaiming-uniform), B ∈ R^{out×r} (zeros), so ΔW = 0 at init.
Trainable parameters per adapted matrix: r·(in + out). Defaults: r = 8 (PEFT), α = r (s = 1),
dropout 0 (PEFT), targets: PEFT's per-architecture choice (Llama: q_proj, v_proj).

``-p rslora=true`` scales by α/√r instead (rsLoRA, Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA", arXiv 2312.03732; PEFT's ``use_rslora``): with α/r a larger rank shrinks the update and
its learning; α/√r keeps the update's scale stable in r. Saved adapters record ``use_rslora``, which PEFT and
deltawise's adapter reader (delta/peft_io.py) both honour.
"""

from __future__ import annotations

from typing import Any, ClassVar

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import LORA_PARAMS
from deltawise.adapt.methods.peft_common import PeftMethod, peft_task_type


@register
class LoRA(PeftMethod):
    name = "lora"
    summary = "low-rank update (α/r)·B A added to each target matrix, B = 0 at init (PEFT)"
    params = LORA_PARAMS
    lora_kwargs: ClassVar[dict[str, Any]] = {}

    def alpha(self) -> float:
        """α, by default the rank (scale 1)."""
        return self.values["rank"] if self.values["alpha"] is None else self.values["alpha"]

    def peft_config(self, task: str, seed: int):
        from peft import LoraConfig

        v = self.values
        return LoraConfig(
            r=v["rank"], lora_alpha=self.alpha(), lora_dropout=v["dropout"], target_modules=v["targets"],
            task_type=peft_task_type(task), use_rslora=v["rslora"], **self.lora_kwargs,
        )
