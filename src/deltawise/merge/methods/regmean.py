"""RegMean: merge each linear layer by solving the regression that matches every model's outputs
on its own data, given only the Gram matrices of the layer inputs.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"
(arXiv 2212.09849; official code bloomberg/dataless-model-merging). With G_i the Gram matrix of
the layer inputs of model i on its data (``deltawise gram``: mean of x x^T), w_i the model
``weight`` and alpha the off-diagonal scale:
    G~_i = w_i (alpha G_i + (1 - alpha) diag(G_i))
    W*^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T      i.e.  W* = (sum_i W_i G~_i)(sum_i G~_i)^-1
(HF weights are out x in, so each row chunk of W* needs only the same rows of every W_i.)
Tensors without a Gram in every file (biases, norms, embeddings, Conv1D layers) are averaged by
weight, as in the official code. The solve runs in float64; an input dimension that no model
ever used (a zero row/column of sum G~) takes the weighted average of that column, and a
singular system (possible with alpha = 1) is solved by least squares.
"""

from __future__ import annotations

import torch

from deltawise.merge.base import MergeMethod, SideInput, TensorJob, register
from deltawise.merge.methods.common import WEIGHT
from deltawise.merge.methods.linear import weighted_average
from deltawise.merge.methods.side_files import open_side_files
from deltawise.merge.params import REQUIRED, Param

KEY = "gram"


def gram_name(weight_name: str):
    return weight_name[: -len(".weight")] + ".gram" if weight_name.endswith(".weight") else None


def scaled_gram(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): off-diagonal entries scaled by alpha."""
    return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))


def regmean_rows(weights_rows: list[torch.Tensor], grams: list[torch.Tensor], coefficients: list[float], alpha: float,
                 solver: dict | None = None) -> torch.Tensor:
    """Rows of W* for the given rows of each W_i (out x in); ``solver`` caches the factorisation."""
    solver = {} if solver is None else solver
    if "system" not in solver:
        scaled = [c * scaled_gram(g.double(), alpha) for g, c in zip(grams, coefficients)]
        total = sum(scaled)
        unused = torch.diagonal(total) == 0
        system = total.clone()
        system[unused, unused] = 1.0  # decoupled dims: W*[:, d] is set to the average below
        chol, info = torch.linalg.cholesky_ex(system)
        solver.update(system=system, scaled=scaled, unused=unused, chol=chol if int(info) == 0 else None)
    rhs = sum(w.double() @ g for w, g in zip(weights_rows, solver["scaled"]))  # rows x in, = (sum W_i G~_i)[rows]
    if solver["chol"] is not None:
        out = torch.cholesky_solve(rhs.T, solver["chol"]).T  # the system is symmetric
    else:
        out = torch.linalg.lstsq(solver["system"], rhs.T, driver="gelsd" if rhs.device.type == "cpu" else None).solution.T
    unused = solver["unused"]
    if bool(unused.any()):
        avg = weighted_average([w.double() for w in weights_rows], coefficients)
        out[:, unused] = avg[:, unused]
    return out.to(weights_rows[0].dtype)


@register
class RegMean(MergeMethod):
    name = "regmean"
    summary = "linear layers: least-squares fit to every model's outputs from input Gram matrices (deltawise gram)"
    reference = "https://arxiv.org/abs/2212.09849"
    base_policy = "input"
    params = (
        Param("gram", str, REQUIRED, scope="model", help="the model's Gram file (.safetensors from `deltawise gram`)"),
        WEIGHT,
        Param("alpha", float, 0.9, low=0.0, high=1.0, help="scale of the Gram matrices' off-diagonal entries (1: exact RegMean)"),
    )

    def side_inputs(self, plan):
        return [SideInput(KEY, open_side_files(plan, "gram", "gram"), name_of=gram_name, whole=True)]

    def check(self, plan):
        problems, averaged = [], 0
        readers = plan.side_inputs[0].readers
        for t in plan.merged:
            if any(p["weight"] <= 0 for p in t.model_params):
                problems.append(f"{t.name}: regmean weights must be > 0")
                break
        for t in plan.merged:
            names = [gram_name(s) for s in t.sources]
            present = [n is not None and n in r for n, r in zip(names, readers)]
            if not all(present):
                averaged += 1
                continue
            width = t.out.shape[-1] if len(t.out.shape) == 2 else None
            for r, n in zip(readers, names):
                if width is None or r.info(n).shape != (width, width):
                    problems.append(f"{r.label}: {n} has shape {list(r.info(n).shape)}; {t.name} needs [{width}, {width}]")
        if averaged:
            plan.warnings.append(f"regmean: {averaged} tensor(s) without a Gram matrix in every file "
                                 "(biases, norms, embeddings) are averaged by weight")
        return problems

    def merge(self, job: TensorJob) -> torch.Tensor:
        weights = [p["weight"] for p in job.model_params]
        grams = job.side.get(KEY, [None] * len(job.models))
        if any(g is None for g in grams):
            return weighted_average(job.models, weights)
        # the factorisation is shared by the row chunks of one tensor (job.stats is per tensor)
        solver = job.stats.setdefault("regmean_solver", {})
        return regmean_rows(job.models, grams, weights, job.params["alpha"], solver)
