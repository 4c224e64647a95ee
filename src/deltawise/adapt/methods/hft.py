"""HFT: Half Fine-Tuning (Hui et al., 2024, arXiv 2404.18466; ACL 2025).

In each transformer layer, a random half of the parameter matrices *by category* trains and the
other half stays frozen at the pre-trained values, so the frozen half keeps old knowledge.
Categories per layer: attention projections (Llama q,k,v,o → 2 of 4), feed-forward matrices
(gate, up, down → 1 or 2 of 3, alternating across layers so that half train on average), and
norms (1 of 2). A module's weight and bias go together. Embeddings, LM head and the final norm
stay frozen; a new classification head trains. Selection ratio p = 0.5 (``ratio``), drawn from
the run's seed; the selection is recorded in ``deltawise_train.json`` (``method_record``).
[No code was released, so the exact per-category rule is our reading of the paper — docs/adapt.md, "Methods".]
Saved delta: dense ΔW = W_trained − W_base (float32) for every selected parameter.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

from torch import nn

from deltawise.adapt.methods.base import DeltaMethod, MethodError, head_names, register
from deltawise.architecture import Role, TensorRoles, architecture_for
from deltawise.delta.dense import DenseDelta
from deltawise.params import Param


def _category(roles: TensorRoles, name: str) -> str:
    """attention, norm or ffn (everything else in a layer), by the role of the parameter's module."""
    role = roles.module_role(name)
    return "norm" if role == Role.NORM else "attention" if role == Role.ATTENTION else "ffn"


def select_half(model: nn.Module, ratio: float, seed: int) -> list[str]:
    """Names of the parameters HFT trains: per layer and category, pick ``n·ratio`` modules at random
    (rounded down on even layers and up on odd ones when ``n·ratio`` is fractional)."""
    groups: dict[tuple[str, int, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    roles = architecture_for(getattr(model, "config", None))
    for name, _ in model.named_parameters():
        split = roles.layer_split(name)
        if not split:
            continue
        prefix, layer, rest = split
        module = rest.rsplit(".", 1)[0]  # weight and bias of one module stay together
        groups[(prefix, layer, _category(roles, name))][module].append(name)
    if not groups:
        raise MethodError("hft found no transformer layers (parameter names like '...layers.N...')")
    rng = random.Random(seed)
    chosen: list[str] = []
    for (prefix, layer, _cat), modules in sorted(groups.items()):
        n = len(modules)
        want = n * ratio
        k = math.floor(want) if layer % 2 == 0 else math.ceil(want)
        for module in rng.sample(sorted(modules), min(n, k)):
            chosen.extend(modules[module])
    return sorted(chosen)


@register
class HFT(DeltaMethod):
    name = "hft"
    summary = "a random half of each layer's matrices per category trains, the other half stays frozen"
    params = (
        Param("ratio", float, 0.5, low=0.0, high=1.0, low_open=True,
              help="fraction of each layer's matrices per category that trains (paper: 0.5), drawn from the seed"),
    )

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        self.selected = select_half(model, self.values["ratio"], seed)
        self.heads = head_names(model, task)
        train = set(self.selected) | set(self.heads)
        params = dict(model.named_parameters())
        for name, p in params.items():
            p.requires_grad_(name in train)
        # the base values, to save a delta; only the selected half is copied
        self.initial = {n: params[n].detach().cpu().clone() for n in self.selected}
        return model

    def deltas(self, model: nn.Module) -> dict[str, DenseDelta]:
        params = dict(model.named_parameters())
        # the base copies stay on the CPU; the trainer may have moved the model to a GPU
        return {n: DenseDelta(params[n].detach().cpu().float() - self.initial[n].float()) for n in self.selected}

    def record(self) -> dict:
        return {"selected": self.selected, "ratio": self.values["ratio"]}
