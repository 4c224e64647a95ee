"""Weight matching (Git Re-Basin): permute model B's hidden units and heads to line up with
model A, then interpolate.

Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin: Merging Models modulo Permutation
Symmetries" (arXiv 2209.04836), code ``samuela/git-re-basin``; docs/merging.md ("weight_matching").
    P* = argmax_P sum_T <A_T, P(B_T)>   (coordinate descent over permutation groups, Hungarian
                                          assignment per group, seeded visiting order)
    theta = (1 - t) * A + t * P*(B)      (t = 1: the permuted B alone; t = 0: A)
Models: exactly two under ``models`` (A first), no base_model. The permutations each model
family allows are listed in ``permutation_specs.py`` (MLP units and whole attention heads per
layer for Llama-like and BERT-like models, hidden units of plain MLP chains); the residual
stream is not permuted. The search runs before the output is written (``prepare``) holding one
permutation group's tensors of both models at a time; the merge then reads B's permuted rows
directly (coalesced row ranges), so each output chunk needs only its own rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from deltawise.io.layout import natural_key
from deltawise.merge.base import MergeMethod, TensorJob, register
from deltawise.merge.params import Param
from deltawise.merge.permutation import block_index, check_spec, touching, weight_matching
from deltawise.merge.permutation_specs import detect_spec

T = Param("t", float, 0.5, low=0.0, high=1.0, help="interpolation: 0 = model A, 1 = the permuted model B")
MAX_ITER = Param("max_iter", int, 100, low=1, help="most coordinate-descent sweeps (stops earlier when a sweep gains nothing)")


def gather_rows(reader, name: str, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of a tensor, reading each run of consecutive rows with one call."""
    idx = index.tolist()
    parts, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1:
            parts.append(reader.get_rows(name, idx[start], idx[i - 1] + 1))
            start = i
    return torch.cat(parts)


@register
class WeightMatching(MergeMethod):
    name = "weight_matching"
    summary = "align model B's hidden units and heads to model A by permutation (Git Re-Basin), then interpolate"
    reference = "https://arxiv.org/abs/2209.04836"
    base_policy = "input"
    min_models = 2
    max_models = 2
    params = (T, MAX_ITER)

    def _spec(self, plan):

        reader = plan.inputs[0].reader
        shapes = {n: tuple(reader.info(n).shape) for n in reader.keys()}
        return detect_spec(shapes, sorted(shapes, key=natural_key), plan.inputs[0].config)

    def check(self, plan) -> list[str]:
        if plan.base is not None:
            return ["weight_matching takes no base_model: list model A, then model B, under models"]
        arch, spec = self._spec(plan)
        if not spec:
            return ["weight_matching found nothing to permute: it supports Llama-like and BERT-like models and plain MLP chains"]
        problems = check_spec(spec, {t.name: tuple(t.out.shape) for t in plan.tensors})
        merged = {t.name for t in plan.merged}
        problems += [f"{ax.tensor} is permuted with other tensors, so it cannot be excluded"
                     for g in spec for ax in g.axes if ax.tensor not in merged]
        for key in ("max_iter",):
            if len({t.params[key] for t in plan.merged}) > 1:
                problems.append(f"{key} must be the same for every tensor")
        return problems

    def prepare(self, plan, out: Path, device: torch.device) -> Optional[str]:
        _, spec = self._spec(plan)
        a, b = plan.inputs
        source = {t.name: t.sources for t in plan.merged}
        perms = weight_matching(
            spec, lambda n: a.reader.get(source[n][0]), lambda n: b.reader.get(source[n][1]),
            seed=plan.recipe.seed, max_iter=plan.merged[0].params["max_iter"],
        )
        self._b, self._source = b.reader, {n: s[1] for n, s in source.items()}
        self._index = {
            name: [(ax.axis, block_index(perms[g.name], ax.block)) for g, ax in pairs] for name, pairs in touching(spec).items()
        }
        digest = hashlib.sha256()
        for name in sorted(perms):
            digest.update(name.encode() + perms[name].numpy().tobytes())
        return digest.hexdigest()

    def permuted_b(self, job: TensorJob) -> torch.Tensor:
        like = job.models[1]
        axes = self._index.get(job.name)
        if not axes:
            return like
        rows = next((index for axis, index in axes if axis == 0), None)
        if rows is None:
            b = like
        else:
            stop = job.row_start + like.shape[0]
            b = gather_rows(self._b, self._source[job.name], rows[job.row_start : stop]).to(like.device, like.dtype)
        for axis, index in axes:
            if axis != 0:
                b = b.index_select(axis, index.to(b.device))
        return b

    def merge(self, job: TensorJob) -> torch.Tensor:
        t = job.params["t"]
        a = job.models[0]
        if t == 0:
            return a
        b = self.permuted_b(job)
        if t == 1:
            return b
        return a.mul(1 - t).add_(b, alpha=t)

