"""HTML tables of the results (every value escaped)."""

from __future__ import annotations

from html import escape
from typing import Iterable, Sequence

from deltawise.analyze.results import Interpolation, WeightsAnalysis
from deltawise.eval.results import EvalResult


def fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(table_id: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def eval_table(evals: list[tuple[str, EvalResult]]) -> str:
    rows = [(lab, d.name, d.role, d.task, d.metric, d.value, d.n_items, d.n_tokens or None, d.seconds, d.tokens_per_s)
            for lab, r in evals for d in r.datasets]
    return table("table-eval", ["run", "dataset", "role", "task", "metric", "value", "items", "tokens", "seconds", "tokens/s"],
                 rows)


def forgetting_table(evals: list[tuple[str, EvalResult]]) -> str:
    rows = []
    for lab, r in evals:
        f = r.forgetting
        if f is None:
            continue
        flips = sum(c.negative_flips.count for c in f.datasets if c.negative_flips)
        rows.append((lab, f.baseline_model, with_interval(f.target_gain, f.target_gain_ci),
                     with_interval(f.source_retention, f.source_retention_ci),
                     with_interval(f.forgetting_score, f.forgetting_score_ci), flips))
    level = next((r.forgetting.intervals["level"] for _, r in evals if r.forgetting and r.forgetting.intervals), None)
    caption = "" if level is None else f" [lo, hi]: {level:.0%} paired bootstrap interval over the items"
    return table("table-forgetting", ["run", "baseline", "target gain", "source retention", "forgetting score",
                                      "negative flips"], rows) + (f"<p class=\"note\">{escape(caption)}</p>" if caption else "")


def with_interval(value: float | None, bounds) -> str:
    """``0.981 [0.962, 0.999]``, or the value alone when it has no interval."""
    if value is None or bounds is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(bounds[0])}, {fmt(bounds[1])}]"


def weights_table(analyses: list[tuple[str, WeightsAnalysis]]) -> str:
    """Per-model delta sizes, then one row per run for the rates measured across all its models together.

    Sign conflicts and the TALL-mask rates describe the set of deltas, not any one model, so they get a row
    per run instead of the same value repeated on every model's row.
    """
    per_model = [(lab, m.model, m.delta_norm, m.relative, m.intruders, m.matrices)
                 for lab, a in analyses for m in a.summary.models]
    across = [(lab, ", ".join(m.model for m in a.summary.models), a.summary.sign_conflict_rate, a.summary.selfish_rate,
               a.summary.catastrophic_rate) for lab, a in analyses]
    return (table("table-weights", ["run", "model", "‖Δ‖", "relative", "intruders", "matrices"], per_model)
            + table("table-weights-across", ["run", "models", "sign conflicts", "selfish", "catastrophic"], across))


def interpolation_table(curves: list[tuple[str, Interpolation]]) -> str:
    rows = [(lab, c.model_a.name, c.model_b.name, c.loss[0], c.loss[-1], c.barrier, c.barrier_lambda, len(c.lambdas))
            for lab, c in curves]
    return table("table-interpolation", ["run", "A", "B", "loss A", "loss B", "barrier", "at λ", "points"], rows)
