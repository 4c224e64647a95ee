"""PCB-merging (Parameter Competition Balancing): score every entry of every task vector by its
size within its task (intra-balancing) and its agreement with the other tasks (inter-balancing),
drop the low scores and average the clipped task vectors with the scores as weights.

Du et al. 2024, "Parameter Competition Balancing for Model Merging" (NeurIPS 2024,
arXiv 2410.02396); this follows the released NLP code (``duguodong7/pcb-merging``,
``task_para_att_merge``), as docs/merging.md ("pcb") restates it. With M the T x d task vectors
(rows = tasks), Norm = per-row min-max normalisation (x - min) / (max - min):
    clip:   M_c = sgn(M) * clamp(|M|, q_lo, q_hi), q_lo / q_hi = sorted |M| row at positions
            int(c*d) and int((1-c)*d - 1)   (c = clip_ratio)
    intra:  b_intra = exp(T * Norm(|M_c|)^2)
    inter:  b_inter = tanh(M * sum_j M_j)
    drop:   b = b_intra * b_inter;  b_hat = Norm(clamp(b, q_r, max b)), q_r = sorted b row at
            position int((1-r)*d)   (r = ratio, the kept fraction)
    merge:  tau_m = sum_t w_t b_hat_t M_c[t] / max(sum_t b_hat_t, 1e-12)
    theta = theta_0 + lambda * tau_m
``weight`` (w_t, default 1) is the per-task scale the vision script applies to M_c[t] before
the merge (lambda_t there); the NLP code uses 1.

Choices (docs/merging.md, "pcb"): the inter term is the released-code form tanh(M * sum M), not
the paper's softmax form; clip_ratio defaults to 0.01 (NLP code; the standalone script uses
0.0001); ratio defaults to 0.1 (standalone script and T5; the grid is 0.05/0.1/0.2); lambda to
1.0 (IA3 setting; the T5 grids start at 0.8). A constant row normalises to zeros (the code
would divide by zero). granularity: global (official: d = every merged entry of the model,
held in memory as T x d float32 while the statistics are gathered) or tensor (d = one tensor;
a deviation from the paper, for models whose T x d does not fit in memory).
Equal values: q_lo, q_hi and q_r are values at sorted positions (``kthvalue``) and clipping and the
drop act on values, so equal entries are always treated alike; every score equal to q_r gets weight
0 (as in the released code), which can drop more than 1 - r of the entries when q_r is tied.
"""

from __future__ import annotations

from typing import Any

import torch

from deltawise.merge.base import MergeMethod, StatsPass, TensorJob, register
from deltawise.merge.methods.common import LAMBDA, WEIGHT
from deltawise.merge.params import Param

RATIO = Param("ratio", float, 0.1, low=0.0, high=1.0, low_open=True,
              help="fraction r of entries of each task kept after balancing")
CLIP_RATIO = Param(
    "clip_ratio", float, 0.01, low=0.0, high=0.5, high_open=True,
    help="fraction of smallest and of largest |tau| clipped in each task before scoring (NLP code 0.01)",
)
GRANULARITY = Param(
    "granularity", str, "global", choices=("global", "tensor"),
    help="statistics over the whole model (official code) or within each tensor (deviation, for large models)",
)


def _normalize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(x - low) / (high - low) per row, zeros where high == low."""
    span = high - low
    return (x - low).div_(torch.where(span > 0, span, torch.ones_like(span))).mul_(span > 0)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def clip_and_score(stacked: torch.Tensor, q_lo: torch.Tensor, q_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_c, b) for task vectors stacked along dim 0, given each row's clip bounds (columns)."""
    n_tasks = stacked.shape[0]
    magnitude = stacked.abs().clamp_(min=q_lo).clamp_(max=q_hi)
    clipped = torch.sign(stacked).mul_(magnitude)
    intra = _normalize(magnitude, q_lo, q_hi).pow_(2).mul_(n_tasks).exp_()
    inter = stacked.mul(stacked.sum(dim=0, keepdim=True)).tanh_()
    return clipped, intra.mul_(inter)


def row_constants(flat: torch.Tensor, clip_ratio: float, ratio: float) -> dict[str, list[float]]:
    """Per-task clip bounds and score bounds from the flattened T x d task vectors."""
    d = flat.shape[1]

    def at(x: torch.Tensor, position: int) -> torch.Tensor:  # 0-based position in each sorted row
        return x.kthvalue(position + 1, dim=1, keepdim=True).values

    magnitude = flat.abs()
    q_lo, q_hi = at(magnitude, int(d * clip_ratio)), at(magnitude, int(d * (1 - clip_ratio) - 1))
    del magnitude
    _, scores = clip_and_score(flat, q_lo, q_hi)
    b_lo, b_hi = at(scores, int(d * (1 - ratio))), scores.max(dim=1, keepdim=True).values
    return {key: v.view(-1).tolist() for key, v in (("q_lo", q_lo), ("q_hi", q_hi), ("b_lo", b_lo), ("b_hi", b_hi))}


def global_memory_bytes(n_models: int, n_entries: int) -> int:
    """Rough peak of global mode: the T x d float32 task vectors plus about two same-sized
    temporaries while the statistics are computed (an estimate, used to refuse up front)."""
    return 3 * n_models * n_entries * 4


class CollectDeltas(StatsPass):
    """Gathers the flattened task vectors of every chunk it sees (one tensor, or the whole model)."""

    label = "gathering task vectors for PCB"

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def update(self, job: TensorJob) -> None:
        self.parts.append(torch.stack([d.reshape(-1).to("cpu", torch.float32) for d in job.deltas()]))

    def constants(self, clip_ratio: float, ratio: float) -> dict[str, list[float]]:
        flat = torch.cat(self.parts, dim=1)
        self.parts = []
        return row_constants(flat, clip_ratio, ratio)


@register
class PCB(MergeMethod):
    name = "pcb"
    summary = "parameter competition balancing: score entries within and across tasks, drop low scores, score-weighted average"
    reference = "https://arxiv.org/abs/2410.02396"
    params = (WEIGHT, RATIO, CLIP_RATIO, LAMBDA, GRANULARITY)

    def check(self, plan):
        if not any(t.params["granularity"] == "global" for t in plan.merged):
            return []
        first = plan.merged[0]
        for t in plan.merged:
            for key in ("granularity", "ratio", "clip_ratio"):
                if t.params[key] != first.params[key]:
                    return [f"with granularity: global, {key} must be the same for every tensor ({t.name} differs)"]
        import psutil  # only here: 20 ms of every merge's start otherwise

        need = global_memory_bytes(len(plan.inputs), sum(t.out_numel for t in plan.merged))
        available = psutil.virtual_memory().available
        if need > available:
            return [
                f"pcb with granularity: global holds every task vector of the whole model in memory "
                f"(about {need / 1e9:.1f} GB here, {available / 1e9:.1f} GB available); "
                "use granularity: tensor, which ranks within each tensor in bounded memory"
            ]
        return []

    def stats_passes(self, plan, stats: dict[str, Any]):
        if not plan.merged or plan.merged[0].params["granularity"] != "global":
            return
        collect = CollectDeltas()
        yield collect
        params = plan.merged[0].params
        stats["pcb"] = collect.constants(params["clip_ratio"], params["ratio"])

    def tensor_passes(self, params, model_params, numel, stats):
        if params["granularity"] == "tensor":
            collect = CollectDeltas()
            yield collect
            stats["pcb"] = collect.constants(params["clip_ratio"], params["ratio"])

    def merge(self, job: TensorJob) -> torch.Tensor:
        const = job.stats["pcb"]
        stacked = torch.stack(job.deltas())
        like = stacked
        clipped, scores = clip_and_score(stacked, _column(const["q_lo"], like), _column(const["q_hi"], like))
        b_lo, b_hi = _column(const["b_lo"], like), _column(const["b_hi"], like)
        balance = _normalize(scores.clamp_(min=b_lo).clamp_(max=b_hi), b_lo, b_hi)
        weights = job.weights()
        weighted = clipped.mul_(balance).mul_(weights.view(-1, *([1] * (clipped.dim() - 1))))
        merged = weighted.sum(dim=0).div_(balance.sum(dim=0).clamp_(min=1e-12))
        scale = job.params["lambda"]
        if scale != 1:
            merged.mul_(scale)
        return merged.add_(job.base)
