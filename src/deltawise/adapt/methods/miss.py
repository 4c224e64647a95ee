"""Bone / MiSS (Kang & Yin, 2024, arXiv 2409.15371), via PEFT's ``miss`` tuner (Bone's new name).

Bone: one trainable B ∈ R^{r×out} (zeros) tiled across the ⌈in/r⌉ input groups, ΔW[o, g·r+k] = B[k, o].
Trainable per matrix: r·out. ``--init bat``: per-row-block affine update ΔW_ij = W_ij B_i + B_i,
trainable (out/r)·r·r = out·r (needs in, out divisible by r). Default r = 64 (capped by the matrix).
Registered as both ``miss`` and ``bone``.
"""

from __future__ import annotations

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.peft_common import PeftMethod, peft_task_type


@register
class MiSS(PeftMethod):
    name = "miss"

    def peft_config(self, task: str, seed: int):
        from peft import MissConfig

        o = self.options
        init = {"bat": "bat", "mini": "mini", None: True, "zero": True}.get(o.init, True)
        return MissConfig(r=o.get("rank", 64), target_modules=o.targets, init_weights=init, task_type=peft_task_type(task))


@register
class Bone(MiSS):
    name = "bone"
