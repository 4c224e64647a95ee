"""Shared plumbing of our own adapters (SORSA, LoLDU, KaSA): wrap target linears, save a low-rank delta.

Each wrapper module keeps the original module name, so ``{name}.weight`` in the delta folder is
the base model's parameter name, and ``delta_factors()`` returns ``(left, right)`` with
``W_adapted − W_base = left @ right`` exactly as its forward computes it: a ``lowrank`` delta
with ``B = left``, ``A = right``, scale 1.
"""

from __future__ import annotations

import torch
from torch import nn

from deltawise.adapt.methods.base import DeltaMethod, head_names, set_submodule, target_linears
from deltawise.delta.lowrank import LowRankDelta


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


class OwnAdapterMethod(DeltaMethod):
    """Replace every target linear by ``wrap(linear)``; all other parameters stay frozen
    (except a new classification head, which trains and is saved whole)."""

    def wrap(self, linear: nn.Linear, seed: int) -> AdaptedLinear:
        raise NotImplementedError

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        heads = set(head_names(model, task))
        for name, p in model.named_parameters():
            p.requires_grad_(name in heads)
        self.modules: dict[str, AdaptedLinear] = {}
        gen_seed = seed
        for name, linear in target_linears(model, self.values["targets"]).items():
            wrapped = self.wrap(linear, gen_seed)
            gen_seed += 1  # distinct but reproducible random inits per layer
            set_submodule(model, name, wrapped)
            self.modules[name] = wrapped
        self.heads = sorted(heads)
        return model

    def deltas(self, model: nn.Module) -> dict[str, LowRankDelta]:
        out = {}
        for name, mod in self.modules.items():
            left, right = (t.detach().cpu() for t in _on_cpu(mod).delta_factors())
            out[f"{name}.weight"] = LowRankDelta(A=right.contiguous(), B=left.contiguous())
        return out


def _on_cpu(mod: AdaptedLinear) -> AdaptedLinear:
    """A shallow copy of ``mod`` whose parameters and buffers are on the CPU: after a sharded (FSDP) run the
    parameters being saved are gathered CPU copies (adapt/sharding.py ``full_parameters``) while the frozen
    buffers stay on the training device, and ``delta_factors`` combines both."""
    import copy

    cpu = copy.copy(mod)
    cpu._parameters = {k: None if p is None else p.detach().cpu() for k, p in mod._parameters.items()}
    cpu._buffers = {k: None if b is None else b.cpu() for k, b in mod._buffers.items()}
    return cpu
