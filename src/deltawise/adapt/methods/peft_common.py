"""Shared plumbing of the PEFT-backed methods: build a PEFT config, wrap the model, save the adapter.

Each PEFT method lives in its own file and only declares its parameters and how they become a PEFT config.
The saved folder is a standard PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
that ``peft.PeftModel.from_pretrained(base, folder)`` loads.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from deltawise.adapt.methods.base import Method, default_targets


def peft_task_type(task: str):
    from peft import TaskType

    return TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM


class PeftMethod(Method):
    kind = "peft"

    def peft_config(self, task: str, seed: int):
        raise NotImplementedError

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        from peft import get_peft_model

        config = self.peft_config(task, seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            # PEFT has no default targets for this architecture: say which -p targets=... to pass
            if getattr(config, "target_modules", ()) is None and "target_modules" in str(exc):
                default_targets(model)
            raise

    def save(self, model: nn.Module, out: Path, base=None) -> None:
        model.save_pretrained(out)
