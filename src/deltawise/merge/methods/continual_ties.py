"""Continual TIES: the sequential TIES baseline of OPCM's paper, as FusionBench runs it.

Tang et al. 2025 (arXiv 2501.09522), baseline "Continual TIES-Merging"; FusionBench's
``ContinualTiesMergingForCLIP``. Models arrive one call at a time (``merge/continual.py``):
    first model:   theta_bar_1 = theta_0 + lambda * tau_1
    model t > 1:   D = theta_bar_{t-1} - theta_0;  v_1 = trim(D), v_2 = trim(tau_t)
                   gamma = sgn(v_1 + v_2)  (zeros take the sign of sum over entries of gamma)
                   theta_bar_t = theta_bar_{t-1} + lambda * sum_{i: sgn(v_i) = gamma} v_i   (disjoint sum)
trim keeps, per vector over the whole model, every entry with |x| >= the (n - int(n * density))-th
smallest magnitude (ties kept), as FusionBench's ``topk_values_mask``; density 0.2 and lambda 0.5
are its defaults. The whole-model thresholds are exact and streaming: a histogram of the top 16
bits of each magnitude's float pattern finds the bin holding the k-th value, a second pass sorts
only that bin. A third pass counts the majority sign; the fourth writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from deltawise.merge.base import register
from deltawise.merge.continual import STATE, ContinualMethod, ContinualState, StepIO, fold_elementwise
from deltawise.merge.params import Param

HISTOGRAM_BITS = 16


def _vectors(io: StepIO) -> Iterator[tuple[Any, int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(tensor, start, stop, previous merged, D = previous - base, tau) for every row chunk."""
    for t in io.plan.merged:
        for a, b in io.rows(t):
            base = io.base(t, a, b)
            previous = io.merged(t, a, b)
            yield t, a, b, previous, previous - base, io.new(t, a, b).sub_(base)


def _top_bits(magnitude: torch.Tensor) -> torch.Tensor:
    bits = 64 if magnitude.dtype == torch.float64 else 32
    as_int = magnitude.view(torch.int64 if bits == 64 else torch.int32).to(torch.int64)
    return as_int >> (bits - 1 - HISTOGRAM_BITS)  # non-negative floats: the pattern orders like the value


def kth_smallest_magnitudes(io: StepIO, ranks: list[int]) -> list[float]:
    """For each of the two vectors (D, tau), its ranks[i]-th smallest |x| over the whole model (1-based)."""
    bins = 1 << HISTOGRAM_BITS
    counts = [torch.zeros(bins, dtype=torch.int64) for _ in ranks]
    for _, _, _, _, d, tau in _vectors(io):
        for i, v in enumerate((d, tau)):
            counts[i] += torch.bincount(_top_bits(v.abs().reshape(-1)), minlength=bins).cpu()
    targets = []
    for count, rank in zip(counts, ranks):
        cumulative = count.cumsum(0)
        b = int(torch.searchsorted(cumulative, torch.tensor(rank)))
        targets.append((b, rank - (int(cumulative[b - 1]) if b > 0 else 0)))
    found: list[list[torch.Tensor]] = [[], []]
    for _, _, _, _, d, tau in _vectors(io):
        for i, v in enumerate((d, tau)):
            m = v.abs().reshape(-1)
            found[i].append(m[_top_bits(m) == targets[i][0]].cpu())
    return [float(torch.cat(vals).sort().values[within - 1]) for vals, (_, within) in zip(found, targets)]


def _trimmed(v: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(v.abs() >= threshold, v, torch.zeros((), dtype=v.dtype, device=v.device))


@register
class ContinualTies(ContinualMethod):
    name = "continual_ties"
    summary = "continual merging baseline: TIES of the running merged task vector and each arriving one"
    reference = "https://arxiv.org/abs/2501.09522"
    params = (
        STATE,
        Param("lambda", float, 0.5, help="scale of each step's TIES update (FusionBench's default 0.5)"),
        Param("density", float, 0.2, low=0.0, high=1.0, low_open=True,
              help="share of each vector's entries kept, over the whole model (FusionBench's threshold 20%)"),
    )

    def fold(self, io: StepIO, state: ContinualState, target: Path) -> dict[str, Any]:
        lam = float(state.params["lambda"])
        if state.merged is None:
            fold_elementwise(io, state, target, lambda previous, base, new: new.sub_(base).mul_(lam).add_(base))
            return {}
        total = sum(t.out_numel for t in io.plan.merged)
        rank = total - int(total * float(state.params["density"]))
        thresholds = [float("-inf")] * 2 if rank <= 0 else kth_smallest_magnitudes(io, [rank, rank])
        majority = 0.0
        for _, _, _, _, d, tau in _vectors(io):
            majority += float(torch.sign(_trimmed(d, thresholds[0]) + _trimmed(tau, thresholds[1])).sum())
        majority_sign = 1.0 if majority > 0 else -1.0 if majority < 0 else 0.0
        writer = io.writer(target)
        for t, a, _, previous, d, tau in _vectors(io):
            v1, v2 = _trimmed(d, thresholds[0]), _trimmed(tau, thresholds[1])
            sign = torch.sign(v1 + v2)
            sign[sign == 0] = majority_sign
            update = torch.where(sign > 0, v1 > 0, v1 < 0) * v1 + torch.where(sign > 0, v2 > 0, v2 < 0) * v2
            writer.write(t.name, previous.add_(update, alpha=lam).to("cpu"), row_start=a)
        writer.finish_empty_shards()
        return {}
