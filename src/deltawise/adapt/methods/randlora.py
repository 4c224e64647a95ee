"""RandLoRA (Albert et al., 2025, arXiv 2502.00987), via PEFT.

ΔW = s·Σ_b B_b diag(Λ[:, b]) A diag(Γ[b]) with frozen random bases; trainable Λ ∈ R^{r×n},
Γ ∈ R^{n×d_min}, n = ⌈d_min/r⌉: per matrix n·(r + d_min). Defaults: r = 32, α = 20·r (PEFT: 640 for r=32).
The random bases come from ``projection_prng_key`` = the run's seed.
"""

from __future__ import annotations

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.peft_common import PeftMethod, peft_task_type


@register
class RandLoRA(PeftMethod):
    name = "randlora"

    def peft_config(self, task: str, seed: int):
        from peft import RandLoraConfig

        o = self.options
        r = o.get("rank", 32)
        return RandLoraConfig(
            r=r, randlora_alpha=int(o.get("alpha", 20 * r)), randlora_dropout=o.dropout, target_modules=o.targets,
            projection_prng_key=seed, task_type=peft_task_type(task),
        )
