"""DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353), via PEFT
(``LoraConfig(use_dora=True)``).

W' = m · (W0 + (α/r)BA) / ‖W0 + (α/r)BA‖_col, with the magnitude m ∈ R^{out} initialised to the
column norms of W0 (so W' = W0 at init). Trainable per matrix: r·(in + out) + out. Parameters as LoRA.
"""

from __future__ import annotations

from typing import Any, ClassVar

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import LORA_PARAMS
from deltawise.adapt.methods.lora import LoRA


@register
class DoRA(LoRA):
    name = "dora"
    summary = "LoRA on the direction of each weight column plus a trainable magnitude per column (PEFT)"
    lora_kwargs: ClassVar[dict[str, Any]] = {"use_dora": True}
    params = LORA_PARAMS  # LoRA's own init=eva is not theirs
