"""Bone / MiSS (Kang & Yin, 2024, arXiv 2409.15371), via PEFT's ``miss`` tuner (Bone's new name).

Bone: one trainable B ∈ R^{r×out} (zeros) tiled across the ⌈in/r⌉ input groups, ΔW[o, g·r+k] = B[k, o].
Trainable per matrix: r·out. ``init=bat``: per-row-block affine update ΔW_ij = W_ij B_i + B_i,
trainable (out/r)·r·r = out·r (needs in, out divisible by r). Default r = 64 (PEFT's; capped by the
matrix). Registered as both ``miss`` and ``bone``.
"""

from __future__ import annotations

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import TARGETS
from deltawise.adapt.methods.peft_common import PeftMethod, peft_task_type
from deltawise.params import Param

# our ``init`` names -> PEFT's ``MissConfig.init_weights``
_PEFT_INIT = {"zero": True, "bat": "bat", "mini": "mini"}


@register
class MiSS(PeftMethod):
    name = "miss"
    summary = "one zero-initialised r×out block tiled over the input groups of each target (Bone; PEFT's MiSS)"
    params = (
        Param("rank", int, 64, low=1, help="block size r (PEFT's default 64)"),
        TARGETS,
        Param("init", str, "zero", choices=tuple(_PEFT_INIT),
              help="zero: Bone/MiSS, B = 0 (PEFT's default); bat: block-affine Bat; mini: PEFT's MiSS-mini"),
    )

    def peft_config(self, task: str, seed: int):
        from peft import MissConfig

        v = self.values
        return MissConfig(r=v["rank"], target_modules=v["targets"], init_weights=_PEFT_INIT[v["init"]],
                          task_type=peft_task_type(task))


@register
class Bone(MiSS):
    name = "bone"
