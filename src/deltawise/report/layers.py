"""Where a delta sits, layer by layer: the per-tensor numbers of ``analyze weights`` summed per layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deltawise.analyze.results import WeightsAnalysis
from deltawise.architecture import architecture_for


@dataclass
class LayerProfile:
    """One model's delta by layer index (tensors outside the layer stack are left out).

    ``relative[i] = sqrt(Σ ||ΔW||²) / sqrt(Σ ||W₀||²)`` over the tensors of layer ``layers[i]``: the layer's
    delta as a fraction of its base weights, so that layers of different sizes compare. ``intruders[i]``
    is the number of intruder dimensions summed over the layer's matrices.
    """

    model: str
    layers: list[int] = field(default_factory=list)
    relative: list[float] = field(default_factory=list)
    intruders: list[int] = field(default_factory=list)


def layer_profiles(analysis: WeightsAnalysis) -> list[LayerProfile]:
    roles = architecture_for(None)  # the analysis keeps no config; the generic layer rule reads the names
    delta_sq: list[dict[int, float]] = [{} for _ in analysis.models]
    base_sq: dict[int, float] = {}
    intruders: list[dict[int, int]] = [{} for _ in analysis.models]
    index = {m.name: i for i, m in enumerate(analysis.models)}
    for t in analysis.tensors:
        layer = roles.layer_index(t.name)
        if layer is None:
            continue
        base_sq[layer] = base_sq.get(layer, 0.0) + t.base_norm**2
        for d in t.deltas:
            delta_sq[index[d.model]][layer] = delta_sq[index[d.model]].get(layer, 0.0) + d.norm**2
        for s in t.intruders or []:
            intruders[index[s.model]][layer] = intruders[index[s.model]].get(layer, 0) + s.count
    layers = sorted(base_sq)
    return [LayerProfile(model=m.name, layers=layers,
                         relative=[math.sqrt(delta_sq[i].get(k, 0.0)) / math.sqrt(base_sq[k]) if base_sq[k] > 0 else math.nan
                                   for k in layers],
                         intruders=[intruders[i].get(k, 0) for k in layers])
            for i, m in enumerate(analysis.models)]
