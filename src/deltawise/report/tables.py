"""HTML tables of the results (every value escaped)."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Iterable, Sequence

from deltawise.analyze.results import Interpolation, WeightsAnalysis
from deltawise.report.runs import BudgetSearch, Runs


@dataclass(frozen=True)
class Cell:
    """A cell whose full text (a path) shows as a tooltip behind a short one."""

    value: object
    title: str


class Numeric(str):
    """Text of a number (a value with its interval): set right-aligned like the numbers."""


def fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(value: object) -> str:
    if isinstance(value, Cell):
        return f'<td title="{escape(value.title)}">{escape(fmt(value.value))}</td>'
    if value is None or (isinstance(value, (int, float, Numeric)) and not isinstance(value, bool)):
        return f'<td class="num">{escape(fmt(value))}</td>'
    return f"<td>{escape(fmt(value))}</td>"


def table(table_id: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def run_cell(runs: Runs, label: str) -> Cell:
    return Cell(label, runs.sources.get(label, label))


def eval_table(runs: Runs) -> str:
    rows = [(run_cell(runs, lab), Cell(d.name, d.path), d.role, d.task, d.metric, d.value, d.n_items, d.n_tokens or None,
             d.seconds, d.tokens_per_s)
            for lab, r in runs.evals for d in r.datasets]
    return table("table-eval", ["run", "dataset", "role", "task", "metric", "value", "items", "tokens", "seconds", "tokens/s"],
                 rows)


def forgetting_table(runs: Runs) -> str:
    rows = []
    for lab, r in runs.evals:
        f = r.forgetting
        if f is None:
            continue
        flips = sum(c.negative_flips.count for c in f.datasets if c.negative_flips)
        rows.append((run_cell(runs, lab), Cell(runs.model_label(f.baseline_model), f.baseline_model),
                     with_interval(f.target_gain, f.target_gain_ci, signed=True),
                     with_interval(f.source_retention, f.source_retention_ci),
                     with_interval(f.forgetting_score, f.forgetting_score_ci), flips))
    level = next((r.forgetting.intervals["level"] for _, r in runs.evals if r.forgetting and r.forgetting.intervals), None)
    caption = "" if level is None else f" [lo, hi]: {level:.0%} paired bootstrap interval over the items"
    return table("table-forgetting", ["run", "baseline", "target gain", "source retention", "forgetting score",
                                      "negative flips"], rows) + (f"<p class=\"note\">{escape(caption)}</p>" if caption else "")


def with_interval(value: float | None, bounds, signed: bool = False) -> str:
    """``0.981 [0.962, 0.999]``: the value and its interval at one precision (3 decimals, 1 from 10 up),
    ``signed`` for a gain; the value alone (4 significant digits) when it has no interval."""
    if value is None or bounds is None:
        return fmt(value)
    decimals = 3 if max(abs(value), abs(bounds[0]), abs(bounds[1])) < 10 else 1
    spec = f"{'+' if signed else ''}.{decimals}f"
    return Numeric(f"{value:{spec}} [{bounds[0]:{spec}}, {bounds[1]:{spec}}]")


def params_text(params: dict[str, object]) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


def budget_table(label: str, search: BudgetSearch) -> str:
    """Every searched point on the selection split: retention with its lower bound, target, verdicts."""
    sources, targets = list(search.budgets), list(search.candidates[0].target) if search.candidates else []
    header = [*search.grid, *[f"retention {s} [lower bound ≥ {search.budgets[s]:g}]" for s in sources],
              *[f"target {t}" for t in targets], "within budget", "Pareto", "chosen"]
    order = sorted(range(len(search.candidates)), key=lambda i: [str(search.candidates[i].params.get(n)) for n in search.grid])
    rows = []
    for i in order:
        c = search.candidates[i]
        rows.append([*[c.params.get(n) for n in search.grid],
                     *[Numeric(f"{c.retention[s]:.3f} [{c.retention_lower.get(s, c.retention[s]):.3f}]") for s in sources],
                     *[with_interval(c.target[t], c.intervals.get(t)) for t in targets],
                     "yes" if c.feasible else "no", "★" if c.pareto else "", "←" if i == search.chosen else ""])
    return table(f"table-budget-{slug(label)}", header, rows)


def heldout_table(label: str, search: BudgetSearch) -> str:
    """The chosen point on the held-out split: the numbers the search reports."""
    held = search.heldout
    if held is None:
        return ""
    rows = [[f"retention {n}", with_interval(v, held.retention_ci.get(n)), f"≥ {search.budgets[n]:g}"]
            for n, v in held.retention.items()]
    rows += [[f"target {n}", with_interval(v, held.target_ci.get(n)), ""] for n, v in held.target.items()]
    return table(f"table-heldout-{slug(label)}", ["held out", "ratio to baseline", "budget"], rows)


def slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label)


def weights_table(runs: Runs) -> str:
    """Per-model delta sizes, then one row per run for the rates measured across all its models together.

    Sign conflicts and the TALL-mask rates describe the set of deltas, not any one model, so they get a row
    per run instead of the same value repeated on every model's row.
    """
    analyses: list[tuple[str, WeightsAnalysis]] = runs.weights
    paths = {m.name: m.path for _, a in analyses for m in a.models}
    per_model = [(run_cell(runs, lab), Cell(m.model, paths.get(m.model, m.model)), m.delta_norm, m.relative, m.intruders,
                  m.matrices)
                 for lab, a in analyses for m in a.summary.models]
    across = [(run_cell(runs, lab), ", ".join(m.model for m in a.summary.models), a.summary.sign_conflict_rate,
               a.summary.selfish_rate, a.summary.catastrophic_rate) for lab, a in analyses]
    return (table("table-weights", ["run", "model", "‖Δ‖", "relative", "intruders", "matrices"], per_model)
            + table("table-weights-across", ["run", "models", "sign conflicts", "selfish", "catastrophic"], across))


def interpolation_table(runs: Runs) -> str:
    curves: list[tuple[str, Interpolation]] = runs.interpolations
    rows = [(run_cell(runs, lab), Cell(c.model_a.name, c.model_a.path), Cell(c.model_b.name, c.model_b.path), c.loss[0],
             c.loss[-1], c.barrier, c.barrier_lambda, len(c.lambdas))
            for lab, c in curves]
    return table("table-interpolation", ["run", "A", "B", "loss A", "loss B", "barrier", "at λ", "points"], rows)


def sources_table(runs: Runs) -> str:
    """Each short label with the file it came from and the model it describes."""
    models: dict[str, str] = {lab: r.model for lab, r in runs.evals}
    models |= {lab: ", ".join(m.path for m in a.models) for lab, a in runs.weights}
    models |= {lab: b.output or "" for lab, b in runs.budgets}
    rows = [(lab, path, models.get(lab, "")) for lab, path in runs.sources.items()]
    return table("table-sources", ["label", "file", "model"], rows)

