"""FourierFT (Gao et al., 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
arXiv 2405.03003), via PEFT.

ΔW = α·Re(ifft2(F)), F zero except at n random positions (PEFT's ``random_loc_seed``) holding trainable
coefficients c. Trainable per matrix: n. Defaults (PEFT's): n = 1000 (capped at out·in), α = 150,
c ~ N(0, 1) as in the paper; ``init=zero`` starts from c = 0 (output = base).
"""

from __future__ import annotations

from deltawise.adapt.methods.base import register
from deltawise.adapt.methods.common import TARGETS
from deltawise.adapt.methods.peft_common import PeftMethod, peft_task_type
from deltawise.params import Param


@register
class FourierFT(PeftMethod):
    name = "fourierft"
    summary = "ΔW = α·Re(ifft2(F)) with n trainable spectral coefficients at random positions (PEFT)"
    params = (
        Param("n_frequency", int, 1000, low=1, help="trainable spectral coefficients n per matrix (PEFT's default 1000)"),
        Param("scaling", float, 150.0, help="α, the scale of the spectral update (PEFT's default 150)"),
        Param("init", str, "random", choices=("random", "zero"),
              help="coefficients c at init: random ~ N(0, 1) (paper, PEFT's default) or zero (output = base at init)"),
        TARGETS,
    )

    def peft_config(self, task: str, seed: int):
        from peft import FourierFTConfig

        v = self.values
        return FourierFTConfig(
            n_frequency=v["n_frequency"], scaling=v["scaling"], target_modules=v["targets"],
            init_weights=v["init"] == "zero", task_type=peft_task_type(task),
        )
