"""DARE: randomly drop task-vector entries and rescale the survivors, then merge linearly
(dare_linear) or with TIES sign consensus (dare_ties).

Yu et al. 2024, "Language Models are Super Mario" (arXiv 2311.03099).
    m ~ Bernoulli(density) per entry;   tau~ = m * tau * s
    s = 1/density (rescale_mode: inverse_density, the paper: E[tau~] = tau) or
    s = ||tau||_1 / ||m * tau||_1 (rescale_mode: l1, mergekit's default)
    dare_linear: theta_0 + lambda * sum_t w_t tau~_t      (/ sum w if normalize)
    dare_ties:   sign election + disjoint merge of w_t tau~_t, as in TIES without the trim
The masks come from ``seed`` in the recipe: the same seed gives the same output. DARE ranks
nothing (each entry is kept at random), so equal magnitudes need no tie rule.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

import deltawise.merge.fused_sparse as fused_sparse
from deltawise.merge.fused_sparse import fused_spec
from deltawise.merge.base import MergeMethod, StatsPass, TensorJob, register
from deltawise.merge.methods.common import DENSITY, INT8_MASK, LAMBDA, WEIGHT, normalize
from deltawise.merge.params import Param
from deltawise.merge.sparsify import bernoulli_mask, combine

RESCALE = Param("rescale", bool, True, help="rescale kept entries (off: 'DropOnly')")
RESCALE_MODE = Param(
    "rescale_mode", str, "l1", choices=("l1", "inverse_density"),
    help="l1: match each tensor's L1 norm (mergekit); inverse_density: divide by density (paper)",
)


class _Dare(MergeMethod):
    consensus: str | None = None
    reference = "https://arxiv.org/abs/2311.03099"

    def fused(self, params, model_params):
        rescale = params["rescale_mode"] if params["rescale"] else None
        return fused_spec(model_params, "random", self.consensus, params["normalize"], params["lambda"], rescale)

    def tensor_passes(self, params, model_params, numel, stats):
        if params["rescale"] and params["rescale_mode"] == "l1":
            densities = tuple(float(p["density"]) for p in model_params)
            l1 = L1Norms(raw=fused_sparse.SparseSpec((), "random", None, False, 1.0, densities))
            yield l1
            stats["scales"] = l1.scales()

    @staticmethod
    def kept(job: TensorJob) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(task vector, its randomly kept part) per model; the masks depend only on the job's seed."""
        deltas = job.deltas()
        return [(d, d * bernoulli_mask(d, p["density"], job.uniform(i)))
                for i, (d, p) in enumerate(zip(deltas, job.model_params))]

    def dropped(self, job: TensorJob) -> list[torch.Tensor]:
        kept = [k for _, k in self.kept(job)]
        if not job.params["rescale"]:
            return kept
        if job.params["rescale_mode"] == "l1":
            return [k * s for k, s in zip(kept, job.stats["scales"])]
        return [k / p["density"] if 0 < p["density"] < 1 else k for k, p in zip(kept, job.model_params)]

    def merge(self, job: TensorJob) -> torch.Tensor:
        return combine(
            job.base, self.dropped(job), job.weights(), consensus=self.consensus,
            normalize=job.params["normalize"], scale=job.params["lambda"],
        )


class L1Norms(StatsPass):
    """Per model: ||tau||_1 over ||m * tau||_1 for the whole tensor (the L1 rescale factor).
    ``kept`` gives the (task vector, kept part) pairs of a job (DARE's by default; DELLA's); ``raw``, the
    same masks as a fused-kernel spec (trim "random" or "della"), lets the pass sum raw chunks."""

    label = "DARE rescale norms"

    def __init__(self, kept: Optional[Callable[[TensorJob], list[tuple[torch.Tensor, torch.Tensor]]]] = None,
                 raw: Optional["fused_sparse.SparseSpec"] = None):
        self.kept = kept or _Dare.kept
        self.before: list[float] = []
        self.after: list[float] = []
        if raw is not None:  # the fused kernels can draw the masks and sum raw chunks
            self.raw = raw
            self.update_raw = self._update_raw

    def _update_raw(self, chunk: "fused_sparse.RawChunk") -> None:
        masks = [torch.ones(chunk.base.numel(), dtype=torch.uint8) if m is None else m
                 for m in fused_sparse.keep_masks(chunk, self.raw)]
        sums = fused_sparse.kept_norms(chunk, self.raw) or fused_sparse.l1_norms(chunk, masks)
        if not self.before:
            self.before, self.after = [0.0] * len(sums), [0.0] * len(sums)
        for i, (before, after) in enumerate(sums):
            self.before[i] += before
            self.after[i] += after

    def update(self, job: TensorJob) -> None:
        pairs = self.kept(job)
        if not self.before:
            self.before, self.after = [0.0] * len(pairs), [0.0] * len(pairs)
        for i, (delta, kept) in enumerate(pairs):
            self.before[i] += float(delta.abs().sum(dtype=torch.float64))
            self.after[i] += float(kept.abs().sum(dtype=torch.float64))

    def scales(self) -> list[float]:
        # as mergekit: leave the kept entries as they are when either norm is ~0
        return [b / a if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in zip(self.before, self.after)]


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
