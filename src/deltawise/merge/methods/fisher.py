"""Fisher merging: a per-parameter average weighted by each model's diagonal Fisher information.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging" (arXiv 2111.09832);
docs/data-merging.md ("fisher"). With lambda_i the model ``weight`` and F_i its Fisher (``deltawise fisher``),
    F~_i = max(F_i / ||F_i||_2, floor)   (normalize: true; ||F_i|| over all entries of the file)
    F~_i = max(F_i, floor)               (normalize: false)
    theta* = sum_i lambda_i F~_i theta_i / sum_i lambda_i F~_i
A tensor that some model's Fisher file lacks (a buffer, a parameter left out) falls back to the
plain weighted average sum_i lambda_i theta_i / sum_i lambda_i; the plan warns about it.
The Fisher files are read like extra inputs, row chunk by row chunk.
"""

from __future__ import annotations

import math

import torch

from deltawise.merge.base import MergeMethod, SideInput, TensorJob, register
from deltawise.merge.methods.common import WEIGHT
from deltawise.merge.methods.linear import weighted_average
from deltawise.merge.methods.side_files import open_side_files
from deltawise.merge.params import REQUIRED, Param

KEY = "fisher"


def fisher_norm(reader) -> float:
    """||F||_2 over every entry of a Fisher file: from its metadata, else computed (one read)."""
    from deltawise.stats.statsfile import read_metadata

    sq = read_metadata(reader.path).get("sq_norm")
    if not isinstance(sq, (int, float)):
        sq = sum(float(reader.get(n).double().square().sum()) for n in reader.keys() if reader.info(n).dtype.is_floating_point)
    return math.sqrt(sq)


def fisher_average(models: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i F_i theta_i / sum_i w_i F_i (F already normalised and floored)."""
    num = torch.zeros_like(models[0])
    den = torch.zeros_like(models[0])
    for theta, f, w in zip(models, fishers, weights):
        wf = f * w
        num.add_(wf * theta)
        den.add_(wf)
    return num / den


@register
class Fisher(MergeMethod):
    name = "fisher"
    summary = "average weighted per parameter by each model's diagonal Fisher (deltawise fisher)"
    reference = "https://arxiv.org/abs/2111.09832"
    base_policy = "input"
    params = (
        Param("fisher", str, REQUIRED, scope="model", help="the model's Fisher file (.safetensors from `deltawise fisher`)"),
        WEIGHT,
        Param("normalize", bool, True, help="divide each model's Fisher by its L2 norm over all entries (official default)"),
        Param("floor", float, 1e-6, low=0.0,
              help="lower bound of every (normalised) Fisher entry; avoids 0/0 for unused parameters"),
    )

    def side_inputs(self, plan):
        return [SideInput(KEY, open_side_files(plan, "fisher", "fisher"), name_of=lambda name: name)]

    def check(self, plan):
        problems = []
        readers = plan.side_inputs[0].readers
        for t in plan.merged:
            if any(p["weight"] < 0 for p in t.model_params) or sum(p["weight"] for p in t.model_params) <= 0:
                problems.append(f"{t.name}: fisher weights must be >= 0 with a positive sum")
                break
        fallback = []
        for t in plan.merged:
            have = []
            for model, reader, source in zip(plan.inputs, readers, t.sources):
                if source in reader:
                    shape = reader.info(source).shape
                    expected = model.reader.info(source).shape
                    if shape != expected:
                        problems.append(f"{reader.label}: {source} has shape {list(shape)}, the model's is {list(expected)}")
                    have.append(True)
                else:
                    have.append(False)
            if not all(have):
                fallback.append(t.name)
        if fallback:
            plan.warnings.append(
                f"{len(fallback)} tensor(s) lack a Fisher in at least one file and are plainly averaged (by weight): "
                + ", ".join(fallback[:5]) + (" ..." if len(fallback) > 5 else "")
            )
        return problems

    def stats_passes(self, plan, stats):
        if any(t.params["normalize"] for t in plan.merged):
            stats["fisher_norms"] = [fisher_norm(r) for r in plan.side_inputs[0].readers]
        return iter(())

    def merge(self, job: TensorJob) -> torch.Tensor:
        weights = [p["weight"] for p in job.model_params]
        fishers = job.side.get(KEY, [None] * len(job.models))
        if any(f is None for f in fishers):
            return weighted_average(job.models, weights)
        floor = job.params["floor"]
        if job.params["normalize"]:
            # a zero Fisher (model never run through these parameters) keeps its floor only
            norms = job.stats["fisher_norms"]
            fishers = [f / n if n > 0 else torch.zeros_like(f) for f, n in zip(fishers, norms)]
        fishers = [f.clamp(min=floor) for f in fishers]
        return fisher_average(job.models, fishers, weights)
