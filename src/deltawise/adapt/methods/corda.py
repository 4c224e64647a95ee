"""CorDA (Yang et al., 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
Task-Aware Parameter-Efficient Fine-tuning", arXiv 2406.05223), via PEFT (``init_lora_weights="corda"``).

For each adapted matrix W, C = Σ x xᵀ is the covariance of its inputs x over calibration data (with a
small damping added to the diagonal). The SVD W C = U S V̂ᵀ gives W = U S (V̂ᵀ C⁻¹). The adapter starts as
r of these components and the frozen weight as the rest (W_res = W − s·B A, so the model equals the base
at init). In knowledge-preserved mode (``mode=kpm``, the default here, PEFT's default is ``ipm``) the
adapter takes the r components with the *smallest* singular values: the directions the calibration
data — the knowledge to keep, e.g. the source language — uses least, so the components that data
relies on stay frozen. In instruction-previewed mode (``mode=ipm``) the calibration data is the task
and the adapter takes the largest components (faster learning, no protection).

``-p calibration=FILE`` (text or JSONL, read as every command reads data) is required; the first
``calibration_examples`` items, each cut to ``calibration_length`` tokens, are run through the model
once before training (PEFT divides each item's inputs by their largest value before they enter C).
Saving converts the adapter, as PiSSA's, into a standard rank-2r LoRA relative to the unmodified base
(PEFT ``path_initial_model_for_weight_conversion``). Parameters as LoRA, plus these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from deltawise.adapt.methods.base import MethodError, default_targets, register
from deltawise.adapt.methods.common import LORA_PARAMS
from deltawise.adapt.methods.pissa import PiSSA
from deltawise.params import Param

CORDA_PARAMS: tuple[Param, ...] = LORA_PARAMS + (
    Param("calibration", str, None, help="data whose knowledge the adapter should leave alone (kpm) or preview (ipm): "
                                         "text or JSONL; default: none, it must be given"),
    Param("mode", str, "kpm", choices=("kpm", "ipm"),
          help="kpm: adapt the components the calibration data uses least (keeps it); ipm: the most (PEFT's default)"),
    Param("calibration_examples", int, 256, low=1, help="calibration items run through the model (PEFT's guide: 256)"),
    Param("calibration_length", int, 256, low=2, help="tokens per calibration item"),
)


@register
class CorDA(PiSSA):
    name = "corda"
    summary = ("LoRA initialised from the SVD of W·C (C: input covariance on calibration data); kpm keeps that data's "
               "directions frozen (PEFT)")
    params = CORDA_PARAMS
    lora_kwargs: ClassVar[dict[str, Any]] = {"init_lora_weights": "corda"}

    def peft_config(self, task: str, seed: int):
        from peft import LoraConfig
        from peft.tuners.lora.config import CordaConfig

        from deltawise.adapt.methods.peft_common import peft_task_type

        v = self.values
        return LoraConfig(
            r=v["rank"], lora_alpha=self.alpha(), lora_dropout=v["dropout"], target_modules=v["targets"],
            task_type=peft_task_type(task), use_rslora=v["rslora"], init_lora_weights="corda",
            corda_config=CordaConfig(corda_method=v["mode"]),
        )

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        from peft import get_peft_model
        from peft.tuners.lora.corda import preprocess_corda

        if self.values["calibration"] is None:
            raise MethodError("corda needs calibration data: -p calibration=FILE (for kpm, the data to keep, "
                              "e.g. the source language)")
        config = self.peft_config(task, seed)
        if config.target_modules is None:  # preprocess_corda runs before get_peft_model would fill PEFT's default
            config.target_modules = set(default_targets(model))
        batches = self._calibration_batches(model)
        device = next(model.parameters()).device

        @torch.no_grad()
        def run_model() -> None:
            was_training = model.training
            model.eval()
            for ids in batches:
                model(input_ids=ids.to(device))
            model.train(was_training)

        preprocess_corda(model, config, run_model=run_model)
        return get_peft_model(model, config)

    def _calibration_batches(self, model: nn.Module) -> list[torch.Tensor]:
        """One tensor of token ids per calibration item, tokenized by the model folder's tokenizer."""
        from deltawise.data.read import load_items
        from deltawise.eval.models import load_tokenizer

        path = Path(self.values["calibration"])
        folder = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
        tokenizer = load_tokenizer(Path(folder))
        items = load_items(path, require=("text",))[: self.values["calibration_examples"]]
        batches = []
        for item in items:
            ids = tokenizer(item.text, truncation=True, max_length=self.values["calibration_length"])["input_ids"]
            if ids:
                batches.append(torch.tensor([ids]))
        if not batches:
            raise MethodError(f"corda: {path} has no text to calibrate on")
        return batches
