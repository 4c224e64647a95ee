"""Full fine-tuning: every parameter trains; the output is a complete model folder (``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from deltawise.adapt.methods.base import Method, register


@register
class Full(Method):
    name = "full"
    kind = "full"
    summary = "every parameter trains; the output is a complete model folder"

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out: Path, base=None) -> None:
        model.save_pretrained(out)
