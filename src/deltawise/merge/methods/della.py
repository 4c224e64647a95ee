"""DELLA: drop task-vector entries at random with a probability that falls with their magnitude
rank (MagPrune), rescale the survivors, then merge with TIES sign consensus (della) or linearly
(della_linear).

Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling" (arXiv 2406.11617). As mergekit 0.1.5 computes it (sparsify.py ``della_magprune``):
    r_j in 1..n: ascending rank of |tau_j| within its row (dimension 1; a vector is one row)
    p_j = (density - epsilon) + 2 epsilon (r_j - 1) / (n - 1)     keep probability, mean = density
    m_j ~ Bernoulli(p_j);   tau~ = m * tau * ||tau||_1 / ||m * tau||_1   (rescale, per tensor)
    della:        sign election + disjoint merge of w_t tau~_t (as TIES without the trim)
    della_linear: sum_t w_t tau~_t                          (/ sum w if normalize)
    theta = theta_0 + lambda * merged
The largest entry of a row is kept with probability density + epsilon, the smallest with
density - epsilon; both must lie in (0, 1). The masks come from ``seed`` in the recipe, drawn
with DARE's block generator (``TensorJob.uniform``): the same seed gives the same output on any
device and chunking, but not mergekit's bits (its masks come from torch's global generator).
Where we differ: the paper rescales each survivor by 1/p_j; mergekit (and we) rescale each
tensor to its L1 norm. A row of one entry is kept with probability density (mergekit divides by
zero there). On the CPU the fused kernel (``_fused_della.c``, ``fused_sparse.della_mask``) draws the same
masks: a stable radix rank per row and the same draws against ``rank_probabilities``' table.
"""

from __future__ import annotations

import torch

import deltawise.merge.fused_sparse as fused_sparse
from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.methods.common import DENSITY, INT8_MASK, LAMBDA, WEIGHT, normalize
from deltawise.merge.methods.dare import RESCALE, L1Norms
from deltawise.merge.fused_sparse import fused_spec
from deltawise.merge.params import Param
from deltawise.merge.sparsify import combine, rank_probabilities

EPSILON = Param(
    "epsilon", float, 0.15, scope="model", low=0.0, high=1.0,
    help="half-width of the keep-probability range: density - epsilon (smallest) .. density + epsilon (largest)",
)


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probability of each entry, from its magnitude rank within its row (dimension
    1, as mergekit; a vector or scalar is one row). Ties are ranked in index order."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
    n = rows.shape[-1]
    if n <= 1:
        return torch.full_like(delta, density)
    order = rows.abs().argsort(dim=-1, stable=True)
    table = rank_probabilities(n, density, epsilon, delta.dtype).to(delta.device)
    probs = torch.empty_like(rows).scatter_(-1, order, table.expand_as(order))  # probs[j] = table[rank of j]
    return probs.reshape(delta.shape) if delta.dim() < 2 else probs.movedim(-1, 1)


class _Della(MergeMethod):
    consensus: str | None = None
    reference = "https://arxiv.org/abs/2406.11617"

    def check(self, plan):
        bad = sorted({
            (p["density"], p["epsilon"])
            for t in plan.merged for p in t.model_params
            if 0 < p["density"] < 1 and not (0 < p["density"] - p["epsilon"] and p["density"] + p["epsilon"] < 1)
        })
        return [
            f"{self.name}: density {d:g} with epsilon {e:g} gives keep probabilities {d - e:g}..{d + e:g}; "
            "density - epsilon and density + epsilon must lie strictly between 0 and 1"
            for d, e in bad[:3]
        ]

    def fused(self, params, model_params):
        rescale = "l1" if params["rescale"] else None
        return fused_spec(model_params, "della", self.consensus, params["normalize"], params["lambda"], rescale)

    def tensor_passes(self, params, model_params, numel, stats):
        stats["scales"] = [1.0] * len(model_params)
        if params["rescale"] and any(0 < p["density"] < 1 for p in model_params):
            densities = tuple(float(p["density"]) for p in model_params)
            epsilons = tuple(float(p["epsilon"]) for p in model_params)
            l1 = L1Norms(self.kept, raw=fused_sparse.SparseSpec((), "della", None, False, 1.0, densities,
                                                                epsilons=epsilons))
            l1.label = "DELLA rescale norms"
            yield l1
            stats["scales"] = l1.scales()

    @staticmethod
    def kept(job: TensorJob) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(task vector, its randomly kept part) per model; the masks depend only on the job's seed."""
        pairs = []
        for i, (delta, p) in enumerate(zip(job.deltas(), job.model_params)):
            density = p["density"]
            if density >= 1:
                pairs.append((delta, delta))
            elif density <= 0:
                pairs.append((delta, torch.zeros_like(delta)))
            else:
                keep = job.uniform(i) < keep_probabilities(delta, density, p["epsilon"])
                pairs.append((delta, delta * keep))
        return pairs

    def merge(self, job: TensorJob) -> torch.Tensor:
        kept = [k for _, k in self.kept(job)]
        kept = [k.mul_(s) if s != 1 else k for k, s in zip(kept, job.stats["scales"])]
        return combine(
            job.base, kept, job.weights(), consensus=self.consensus,
            normalize=job.params["normalize"], scale=job.params["lambda"],
        )


@register
class Della(_Della):
    name = "della"
    summary = "magnitude-ranked random drop + rescale of task vectors, then TIES sign consensus"
    consensus = "mergekit"
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA, normalize(True), RESCALE, INT8_MASK)


@register
class DellaLinear(_Della):
    name = "della_linear"
    summary = "magnitude-ranked random drop + rescale of task vectors, then task arithmetic"
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA, normalize(False), RESCALE, INT8_MASK)
