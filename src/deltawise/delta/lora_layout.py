"""Where a PEFT LoRA adapter keeps the changes that are not LoRA factors: the one rule of ``extract --lora`` and of
the merge's adapter output (``merge --output-format adapter``).

A LoRA (Hu et al. 2021, arXiv 2106.09685) changes a layer's weight by ``s · B A``; a fine-tune also moves other
tensors, such as the bias of every linear layer in a BERT-style full fine-tune. Per changed tensor that is not a
LoRA factor (its delta ``Δ``, its new value ``v``):

- the bias of a module whose weight is a linear weight is written as PEFT's ``lora_B.bias = Δb`` (``lora_bias:
  true``; PEFT's forward adds ``s · lora_B.bias``, its merge gives ``b + s · Δb``, here ``s = 1``); a module whose
  weight did not change gets zero rank-1 factors to carry its bias;
- ``lora_bias`` is one switch for every LoRA module and gives each a bias, and PEFT cannot merge a LoRA bias into a
  layer without one: when some LoRA module's base layer has no bias, the modules with a bias change are saved whole
  instead (exact, larger), with a warning;
- beside LoRA embeddings (PEFT has no ``lora_bias`` for ``nn.Embedding``) a bias is written as its module's new value
  ``<module>.base_layer.bias`` (``bias: "lora_only"``), which PEFT loads into the base layer; it needs neither;
- any other changed tensor (a norm, an embedding table saved whole) is saved whole (``modules_to_save``), and so is
  every tensor of its module: a LoRA weight there, and the unchanged ones (PEFT replaces the whole module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from deltawise.architecture import TensorRoles
from deltawise.delta.lowrank import LowRankDelta
from deltawise.delta.peft_io import complete_modules
from deltawise.io.reader import ModelReader

# (tensor name, its delta) -> the tensor's new value, as the adapter stores it whole
NewValue = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class LoraLayout:
    """What a LoRA adapter stores, by base tensor name (the arguments of ``write_peft_adapter``)."""

    lowrank: dict[str, LowRankDelta]
    whole: dict[str, torch.Tensor]  # new values, modules_to_save (with the unchanged rest of their modules)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # bias deltas: lora_B.bias
    bias_values: dict[str, torch.Tensor] = field(default_factory=dict)  # new bias values: base_layer.bias
    how: dict[str, str] = field(default_factory=dict)  # changed tensor -> "bias" | "full" (LoRA weights kept: absent)
    warnings: list[str] = field(default_factory=list)


def lora_layout(lowrank: dict[str, LowRankDelta], changed: dict[str, torch.Tensor], base: ModelReader,
                roles: TensorRoles, dtype: torch.dtype, new_value: NewValue) -> LoraLayout:
    """Place the changed tensors ``changed`` (name -> delta) that are not LoRA factors beside the LoRA factors
    ``lowrank`` by the rule of the module docstring. ``dtype``: of lora_B.bias and of the zero factors; ``new_value``
    gives the value of a tensor saved whole or of a bias written as ``base_layer.bias``. The arguments are not
    modified."""
    whole_modules: set[str] = set()
    biased: set[str] = set()
    for name in changed:
        module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        weight = f"{module}.weight"
        if leaf == "bias" and weight in base and roles.is_linear_weight(weight, tuple(base.info(weight).shape)):
            biased.add(module)
        else:
            whole_modules.add(module)
    layout = LoraLayout(dict(lowrank), {})
    lora_modules = ({n.rsplit(".", 1)[0] for n in lowrank} | biased) - whole_modules
    tables = any(d.transpose for d in lowrank.values())
    if not tables and biased - whole_modules and any(f"{m}.bias" not in base for m in lora_modules):
        layout.warnings.append(f"{len(biased - whole_modules)} module(s) with a bias change saved whole "
                               "(modules_to_save): PEFT's lora_bias would also give a bias to LoRA modules whose base "
                               "layer has none")
        whole_modules |= biased
    for name, d in lowrank.items():  # a module saved whole carries its weight whole too
        if name.rsplit(".", 1)[0] in whole_modules:
            del layout.lowrank[name]
            layout.whole[name] = new_value(name, d.materialize(torch.float64 if d.A.dtype == torch.float64
                                                               else torch.float32))
            layout.how[name] = "full"
    for name, delta in changed.items():
        module = name.rsplit(".", 1)[0]
        if module in whole_modules:
            layout.whole[name] = new_value(name, delta)
            layout.how[name] = "full"
            continue
        weight = f"{module}.weight"
        if weight not in layout.lowrank:  # a bias whose weight did not change: zero rank-1 factors carry it
            out_features, in_features = base.info(weight).shape
            layout.lowrank[weight] = LowRankDelta(torch.zeros(1, in_features, dtype=dtype),
                                                  torch.zeros(out_features, 1, dtype=dtype))
        if tables:
            layout.bias_values[name] = new_value(name, delta)
        else:
            layout.bias[name] = delta.to(dtype)
        layout.how[name] = "bias"
    layout.whole.update(complete_modules(layout.whole, base))
    return layout


def tied_heads(whole: dict[str, torch.Tensor], lowrank: dict[str, LowRankDelta], base: ModelReader,
               roles: TensorRoles) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The output heads a tied base does not store, saved whole when their input embedding changes (as mergekit's
    ``mergekit-extract-lora`` does), with a warning per LoRA embedding's head: PEFT replaces a saved embedding module
    only, and its LoRA on an embedding adapts the lookup only, either of which leaves the tied head at the base value
    in ``PeftModel``'s forward. A saved embedding's head is its value (a copy: safetensors refuses shared memory); a
    LoRA embedding's head is ``base + (B A)ᵀ``, the embedding PEFT's merge gives."""
    heads: dict[str, torch.Tensor] = {}
    warnings: list[str] = []
    for head, alias in roles.unstored_tied_heads(base).items():
        if alias in whole:
            heads[head] = whole[alias].clone()
        elif alias in lowrank:
            factors, value = lowrank[alias], base.get(alias)
            work = torch.float64 if torch.float64 in (value.dtype, factors.A.dtype) else torch.float32
            heads[head] = (value.to(work) + factors.materialize(work)).to(value.dtype)
            warnings.append(f"{head} is tied to {alias}, written as LoRA-embedding factors; PEFT's LoRA on an embedding "
                            f"leaves a tied head at the base value in PeftModel's forward, so {head} is saved whole "
                            f"({heads[head].numel() * heads[head].element_size() / 1e6:.1f} MB)")
    return heads, warnings
