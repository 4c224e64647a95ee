"""RandLoRA (Albert et al., 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
arXiv 2502.00987), via PEFT.

ΔW = s·Σ_b B_b diag(Λ[:, b]) A diag(Γ[b]) with frozen random bases; trainable Λ ∈ R^{r×n},
Γ ∈ R^{n×d_min}, n = ⌈d_min/r⌉: per matrix n·(r + d_min). Defaults: r = 32, α = 20·r (PEFT: 640 for r=32).
The random bases come from ``projection_prng_key`` = the run's seed.
"""

from __future__ import annotations

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import DROPOUT, TARGETS
from deltawise.adapt.methods.peft_common import PeftMethod, peft_task_type
from deltawise.params import Param


@register
class RandLoRA(PeftMethod):
    name = "randlora"
    summary = "full-rank update from frozen random bases with trainable diagonal scales Λ, Γ (PEFT)"
    params = (
        Param("rank", int, 32, low=1, help="rank r of each random basis (PEFT's default 32)"),
        Param("alpha", float, None, low=0.0, low_open=True,
              help="scaling coefficient, rounded down to an integer; default: 20·rank (PEFT: 640 for r = 32)"),
        DROPOUT,
        TARGETS,
    )

    def peft_config(self, task: str, seed: int):
        from peft import RandLoraConfig

        v = self.values
        alpha = 20 * v["rank"] if v["alpha"] is None else v["alpha"]
        return RandLoraConfig(
            r=v["rank"], randlora_alpha=int(alpha), randlora_dropout=v["dropout"], target_modules=v["targets"],
            projection_prng_key=seed, task_type=peft_task_type(task),
        )
