"""DARE: randomly drop task-vector entries and rescale the survivors, then merge linearly
(dare_linear) or with TIES sign consensus (dare_ties).

Yu et al. 2024, "Language Models are Super Mario" (arXiv 2311.03099).
    m ~ Bernoulli(density) per entry;   tau~ = m * tau * s
    s = 1/density (rescale_mode: inverse_density, the paper: E[tau~] = tau) or
    s = ||tau||_1 / ||m * tau||_1 (rescale_mode: l1, mergekit's default)
    dare_linear: theta_0 + lambda * sum_t w_t tau~_t      (/ sum w if normalize)
    dare_ties:   sign election + disjoint merge of w_t tau~_t, as in TIES without the trim
The masks come from ``seed`` in the recipe: the same seed gives the same output.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.methods.common import DENSITY, INT8_MASK, LAMBDA, WEIGHT, normalize
from deltawise.merge.params import Param
from deltawise.merge.sparsify import bernoulli_mask, combine, rescale

RESCALE = Param("rescale", bool, True, help="rescale kept entries (off: 'DropOnly')")
RESCALE_MODE = Param(
    "rescale_mode", str, "l1", choices=("l1", "inverse_density"),
    help="l1: match each tensor's L1 norm (mergekit); inverse_density: divide by density (paper)",
)


class _Dare(MergeMethod):
    consensus: str | None = None
    reference = "https://arxiv.org/abs/2311.03099"

    def elementwise(self, params):
        # the L1 rescale needs whole-tensor norms; the paper's 1/density does not
        return not params["rescale"] or params["rescale_mode"] == "inverse_density"

    def dropped(self, job: TensorJob) -> list[torch.Tensor]:
        out = []
        for i, (delta, p) in enumerate(zip(job.deltas(), job.model_params)):
            kept = delta * bernoulli_mask(delta, p["density"], job.generator(i))
            out.append(rescale(kept, delta, job.params["rescale_mode"], p["density"]) if job.params["rescale"] else kept)
        return out

    def merge(self, job: TensorJob) -> torch.Tensor:
        return combine(
            job.base, self.dropped(job), job.weights(), consensus=self.consensus,
            normalize=job.params["normalize"], scale=job.params["lambda"],
        )


@register
class DareLinear(_Dare):
    name = "dare_linear"
    summary = "random drop + rescale of task vectors, then task arithmetic"
    params = (WEIGHT, DENSITY, LAMBDA, normalize(False), RESCALE, RESCALE_MODE)


@register
class DareTies(_Dare):
    name = "dare_ties"
    summary = "random drop + rescale of task vectors, then TIES sign consensus"
    consensus = "mergekit"
    params = (WEIGHT, DENSITY, LAMBDA, normalize(False), RESCALE, RESCALE_MODE, INT8_MASK)
