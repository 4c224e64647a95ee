"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685), via PEFT.

ΔW = (α/r)·B A with A ∈ R^{r×in} (Kaiming-uniform), B ∈ R^{out×r} (zeros), so ΔW = 0 at init.
Trainable parameters per adapted matrix: r·(in + out). Defaults: r = 8 (PEFT), α = r (s = 1),
dropout 0 (PEFT), targets: PEFT's per-architecture choice (Llama: q_proj, v_proj).

``-p rslora=true`` scales by α/√r instead (rsLoRA, Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA", arXiv 2312.03732; PEFT's ``use_rslora``): with α/r a larger rank shrinks the update and
its learning; α/√r keeps the update's scale stable in r. Saved adapters record ``use_rslora``, which PEFT and
deltawise's adapter reader (delta/peft_io.py) both honour.

``-p init=eva`` starts A at the top right-singular vectors of each layer's inputs on training batches, with
ranks redistributed across layers by explained variance (EVA, Paischer et al. 2024, arXiv 2410.07170; the
``eva_*`` parameters and the formula: adapt/methods/eva.py). LoRA only: the subclasses (dora, pissa, lora_fa)
take ``LORA_PARAMS`` without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import LORA_PARAMS
from deltawise.adapt.methods.eva import EVA_PARAMS, check_eva_values, eva_lora_kwargs, eva_requested, initialise_eva
from deltawise.adapt.methods.peft_common import PeftMethod, peft_task_type


@register
class LoRA(PeftMethod):
    name = "lora"
    summary = "low-rank update (α/r)·B A added to each target matrix, B = 0 at init (PEFT); -p init=eva: EVA's data-driven A"
    params = LORA_PARAMS + EVA_PARAMS
    lora_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(self, values: Mapping[str, Any] | None = None):
        super().__init__(values)
        check_eva_values(self.values, values)
        self._eva_ranks: dict[str, int] = {}

    def alpha(self) -> float:
        """α, by default the rank (scale 1)."""
        return self.values["rank"] if self.values["alpha"] is None else self.values["alpha"]

    def peft_config(self, task: str, seed: int):
        from peft import LoraConfig

        v = self.values
        return LoraConfig(
            r=v["rank"], lora_alpha=self.alpha(), lora_dropout=v["dropout"], target_modules=v["targets"],
            task_type=peft_task_type(task), use_rslora=v["rslora"], **self.lora_kwargs, **eva_lora_kwargs(v),
        )

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        with warnings.catch_warnings():
            # EVA's adapters are allocated at rank r and replaced by ``initialise`` (small next to the model): PEFT's
            # advice to leave them unallocated (low_cpu_mem_usage) would keep the model from moving to the device
            warnings.filterwarnings("ignore", message="lora with eva initialization used with low_cpu_mem_usage=False")
            return super().prepare(model, task, seed)

    def initialise(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str | None,
                   note: Callable[[str], None] | None) -> None:
        if eva_requested(self.values):
            self._eva_ranks = initialise_eva(model, batches, self.values, device, note)

    def initialises_from_data(self) -> bool:
        return eva_requested(self.values)

    def record(self) -> dict[str, Any]:
        return {"eva_ranks": self._eva_ranks} if self._eva_ranks else {}
