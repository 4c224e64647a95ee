"""FourierFT (Gao et al., 2024, arXiv 2405.03003), via PEFT.

ΔW = α·Re(ifft2(F)), F zero except at n random (seeded) positions holding trainable coefficients c.
Trainable per matrix: n. Defaults: n = 1000 (capped at out·in), α (``--scaling``) = 150,
c ~ N(0, 1) as in the paper and PEFT; ``--init zero`` starts from c = 0 (output = base).
"""

from __future__ import annotations

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.peft_common import PeftMethod, peft_task_type


@register
class FourierFT(PeftMethod):
    name = "fourierft"

    def peft_config(self, task: str, seed: int):
        from peft import FourierFTConfig

        o = self.options
        return FourierFTConfig(
            n_frequency=o.get("n_frequency", 1000), scaling=o.get("scaling", 150.0), target_modules=o.targets,
            init_weights=o.init == "zero", task_type=peft_task_type(task),
        )
