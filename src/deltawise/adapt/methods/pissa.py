"""PiSSA (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
Models", arXiv 2404.02948): LoRA initialised from the top-r SVD of W, via PEFT (``init_lora_weights="pissa"``).

A = diag(√S_r)V_rᵀ, B = U_r diag(√S_r) (scaled by 1/s), base weight replaced by W − s·BA, so the
model output equals the base at init. Trainable per matrix: r·(in + out).

Saving: the trained adapter is relative to the residual weight, so it is converted on save
(PEFT ``path_initial_model_for_weight_conversion``) into a standard rank-2r LoRA relative to the
original W: ΔW = s(BA − B0A0). The saved folder therefore loads on the unmodified base model.
Sharded (FSDP2): the SVD runs before the model is sharded, and the conversion on the gathered weights
(``sharding.full_parameters``). Parameters as LoRA.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import LORA_PARAMS
from deltawise.adapt.methods.lora import LoRA


@register
class PiSSA(LoRA):
    name = "pissa"
    summary = "LoRA whose factors start at the top-r singular components of W, the rest of W frozen (PEFT)"
    lora_kwargs: ClassVar[dict[str, Any]] = {"init_lora_weights": "pissa"}
    params = LORA_PARAMS  # LoRA's own init=eva is not theirs
    _init_dir: Path | None = None

    def before_training(self, model: nn.Module, staging: Path) -> None:
        self._init_dir = staging / "_pissa_init"
        config = model.peft_config["default"]
        # PEFT's documented recipe: save the initial adapter marked as plain-init, then restore
        config.init_lora_weights = True
        model.save_pretrained(self._init_dir)
        config.init_lora_weights = self.lora_kwargs["init_lora_weights"]

    def save(self, model: nn.Module, out: Path, base=None) -> None:
        if self._init_dir is None:
            raise RuntimeError("PiSSA.save called before before_training")
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(self._init_dir))
        shutil.rmtree(self._init_dir, ignore_errors=True)
