"""Shared plumbing of our own adapters (SORSA, LoLDU, KaSA): wrap target linears, save a low-rank delta.

Each wrapper module keeps the original module name, so ``{name}.weight`` in the delta folder is
the base model's parameter name, and ``delta_factors()`` returns ``(left, right)`` with
``W_adapted − W_base = left @ right`` exactly as its forward computes it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deltawise.adapt.delta_file import DeltaEntry, save_delta
from deltawise.adapt.methods.base import Method, head_names, set_submodule, target_linears


class AdaptedLinear(nn.Module):
    """Base of the wrappers: frozen weight ``w_frozen`` (float32 copy) and bias, plus an update."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def merged_weight(self, original: torch.Tensor) -> torch.Tensor:
        left, right = self.delta_factors()
        return original.float() + left @ right


class OwnAdapterMethod(Method):
    """Replace every target linear by ``wrap(linear)``; all other parameters stay frozen
    (except a new classification head, which trains and is saved whole)."""

    kind = "delta"

    def wrap(self, linear: nn.Linear, seed: int) -> AdaptedLinear:
        raise NotImplementedError

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        heads = set(head_names(model, task))
        for name, p in model.named_parameters():
            p.requires_grad_(name in heads)
        self.modules: dict[str, AdaptedLinear] = {}
        gen_seed = seed
        for name, linear in target_linears(model, self.options.targets).items():
            wrapped = self.wrap(linear, gen_seed)
            gen_seed += 1  # distinct but reproducible random inits per layer
            set_submodule(model, name, wrapped)
            self.modules[name] = wrapped
        self.heads = sorted(heads)
        return model

    def save(self, model: nn.Module, out: Path) -> None:
        entries: dict[str, DeltaEntry] = {}
        for name, mod in self.modules.items():
            left, right = (t.detach() for t in mod.delta_factors())
            entries[f"{name}.weight"] = DeltaEntry("lowrank", {"left": left, "right": right})
        params = dict(model.named_parameters())
        for name in self.heads:
            entries[name] = DeltaEntry("replace", {"value": params[name].detach()})
        save_delta(out, entries, {"method": self.name, "options": {k: v for k, v in vars(self.options).items() if v is not None}})
