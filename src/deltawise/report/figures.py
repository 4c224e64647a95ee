"""Matplotlib figures rendered to inline SVG text (no files, no network)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display here, and no GUI toolkit may be imported
import matplotlib.pyplot as plt  # noqa: E402

from deltawise.analyze.results import Interpolation, WeightsAnalysis  # noqa: E402
from deltawise.report import layers  # noqa: E402
from deltawise.report.runs import BudgetSearch, Runs  # noqa: E402

plt.rcParams.update({"svg.hashsalt": "deltawise", "svg.fonttype": "none", "font.size": 9})


def to_svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: invalid inside HTML


def _label(ax, xlabel: str, ylabel: str, title: str, legend: bool = False) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=7)


def tradeoff(runs: Runs) -> str | None:
    """Each run's retention against its gain, with interval bars; a budget search adds its searched points,
    its Pareto front and its budget line."""
    points = [(lab, r.forgetting) for lab, r in runs.evals
              if r.forgetting and r.forgetting.target_gain is not None and r.forgetting.source_retention is not None]
    searches = [(lab, b) for lab, b in runs.budgets if b.candidates]
    if not points and not searches:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    baselines = {runs.model_label(f.baseline_model) for _, f in points}
    if len(baselines) == 1:  # every run's point is relative to this one model, which sits where the dashed lines cross
        ax.plot([0.0], [1.0], marker="*", ms=11, color="#555555", zorder=3)
        ax.annotate(f"{baselines.pop()} (baseline)", (0.0, 1.0), textcoords="offset points", xytext=(6, -12), fontsize=8,
                    color="#555555")
    for lab, search in searches:
        _searched_points(ax, lab, search, several=len(searches) > 1)
    for k, (lab, f) in enumerate(points):
        # interval bars where the run has them (paired bootstrap, eval/intervals.py)
        xerr = (None if f.target_gain_ci is None
                else [[f.target_gain - f.target_gain_ci[0]], [f.target_gain_ci[1] - f.target_gain]])
        yerr = (None if f.source_retention_ci is None
                else [[f.source_retention - f.source_retention_ci[0]], [f.source_retention_ci[1] - f.source_retention]])
        colour = COLOURS[k % len(COLOURS)]
        ax.errorbar(f.target_gain, f.source_retention, xerr=xerr, yerr=yerr, fmt="o", ms=7, capsize=3, lw=1.2,
                    color=colour, zorder=3)
        ax.annotate(lab, (f.target_gain, f.source_retention), textcoords="offset points", xytext=(6, 5), fontsize=9,
                    color=colour, fontweight="bold", zorder=4,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})  # legible over bars
    for lab, search in searches:  # the chosen point (selection texts) to its written model's evaluation (held-out texts)
        run = next((r.forgetting for _, r in runs.evals if search.output and r.model == search.output and r.forgetting
                    and r.forgetting.target_gain is not None and r.forgetting.source_retention is not None), None)
        if run is not None and search.chosen is not None:
            chosen = search.candidates[search.chosen]
            ax.annotate("", xy=(run.target_gain, run.source_retention), xytext=(chosen.target_score - 1, chosen.retention_min),
                        arrowprops={"arrowstyle": "->", "color": "#777777", "lw": 0.8, "ls": "--"}, zorder=1)
    _label(ax, "target gain (mean ratio to base − 1; > 0 is better)", "source retention (ratio to base; 1 = nothing lost)",
           "Trade-off: what each run gained vs what it kept", legend=bool(searches))
    return to_svg(fig)


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _searched_points(ax, lab: str, search: BudgetSearch, several: bool) -> None:
    """Hollow markers at (target − 1, smallest retention), scored on the search's selection split."""
    suffix = f" ({lab})" if several else ""
    for value in sorted(set(search.budgets.values())):
        ax.axhline(value, color="#c0504d", lw=1, ls=":", label=f"retention budget {value:g}{suffix}")
    feasible_drawn = infeasible_drawn = False
    for i, c in enumerate(search.candidates):
        worst = min(c.retention, key=lambda n: c.retention[n])
        lo_hi = c.intervals.get(worst)
        yerr = None if lo_hi is None else [[c.retention_min - lo_hi[0]], [lo_hi[1] - c.retention_min]]
        x, y = c.target_score - 1, c.retention_min
        label = None
        if c.feasible and not feasible_drawn:
            label, feasible_drawn = f"searched, within budget (selection texts){suffix}", True
        elif not c.feasible and not infeasible_drawn:
            label, infeasible_drawn = f"searched, over budget (selection texts){suffix}", True
        ax.errorbar(x, y, yerr=yerr, fmt="o", ms=6, mfc="white", mec="#2e7d32" if c.feasible else "#999999",
                    ecolor="#bbbbbb", capsize=2, lw=0.8, label=label, zorder=2)
        if worst in c.retention_lower:
            ax.plot([x], [c.retention_lower[worst]], marker="_", ms=9, color="#2e7d32" if c.feasible else "#999999", zorder=2)
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.params.items())
        ax.annotate(shown + (" (chosen)" if i == search.chosen else ""), (x, y), textcoords="offset points", xytext=(5, -10),
                    fontsize=7, color="#555555")
    front = sorted((c.target_score - 1, c.retention_min) for c in search.candidates if c.pareto)
    if len(front) > 1:
        ax.plot(*zip(*front), color="#2e7d32", lw=0.8, ls="-", alpha=0.6, label=f"Pareto front of the search{suffix}")


def budget_search(search: BudgetSearch) -> str | None:
    """Retention and target of each searched point against the one searched numeric parameter."""
    if len(search.grid) != 1 or not search.candidates:
        return None
    name = next(iter(search.grid))
    cands = sorted((c for c in search.candidates if isinstance(c.params.get(name), (int, float))), key=lambda c: c.params[name])
    if len(cands) < 2:
        return None
    xs = [c.params[name] for c in cands]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 4.8), sharex=True)
    for source, minimum in search.budgets.items():
        ys = [c.retention[source] for c in cands]
        err = [[y - c.intervals[source][0] if source in c.intervals else 0 for y, c in zip(ys, cands)],
               [c.intervals[source][1] - y if source in c.intervals else 0 for y, c in zip(ys, cands)]]
        top.errorbar(xs, ys, yerr=err, fmt="o-", ms=4, capsize=3, lw=1, label=f"retention {source}")
        top.plot(xs, [c.retention_lower.get(source, c.retention[source]) for c in cands], "v", ms=5, color="#2e7d32",
                 label=f"one-sided lower bound ({source})")
        top.axhline(minimum, color="#c0504d", lw=1, ls=":", label=f"budget {minimum:g}")
    for target in cands[0].target:
        ys = [c.target[target] - 1 for c in cands]
        err = [[y - (c.intervals[target][0] - 1) if target in c.intervals else 0 for y, c in zip(ys, cands)],
               [(c.intervals[target][1] - 1) - y if target in c.intervals else 0 for y, c in zip(ys, cands)]]
        bottom.errorbar(xs, ys, yerr=err, fmt="s-", ms=4, capsize=3, lw=1, color="#1f77b4", label=f"gain {target}")
    if search.chosen is not None and search.candidates[search.chosen].params.get(name) is not None:
        for axis in (top, bottom):
            axis.axvline(search.candidates[search.chosen].params[name], color="#555555", lw=0.8, ls="--")
    top.set_ylabel("retention (ratio to base)")
    top.legend(fontsize=7)
    bottom.set_ylabel("target gain (ratio − 1)")
    bottom.legend(fontsize=7)
    _label(bottom, f"{name} (dashed: chosen)", "target gain (ratio − 1)", "")
    top.set_title(f"{search.method}: the searched points on the selection split")
    return to_svg(fig)


def interpolation(curves: list[tuple[str, Interpolation]]) -> str | None:
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, c in curves:
        ax.plot(c.lambdas, c.loss, marker="o", ms=3, label=f"{c.model_a.name} → {c.model_b.name} (barrier {c.barrier:.3g})")
    _label(ax, "λ  (0 = model A, 1 = model B)", "loss (mean NLL per token)", "Linear interpolation curves", legend=True)
    return to_svg(fig)


def layer_profiles(analyses: list[tuple[str, WeightsAnalysis]]) -> str | None:
    """Per layer: each model's delta relative to the base (top) and its intruder dimensions (bottom)."""
    profiles = [(lab, p) for lab, a in analyses for p in layers.layer_profiles(a) if p.layers]
    if not profiles:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.2), sharex=True)
    several = len(analyses) > 1
    for k, (lab, p) in enumerate(profiles):
        name = f"{lab}: {p.model}" if several else p.model
        colour = COLOURS[k % len(COLOURS)]
        top.plot(p.layers, p.relative, marker="o", ms=3, lw=1.2, color=colour, label=name)
        bottom.plot(p.layers, p.intruders, marker="s", ms=3, lw=1.2, color=colour, label=name)
    top.set_ylabel("‖ΔW‖ / ‖W₀‖ of the layer")
    top.set_title("Where each delta sits: size and intruder dimensions by layer")
    top.legend(fontsize=7)
    bottom.set_ylabel("intruder dimensions")
    bottom.set_xlabel("layer")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    return to_svg(fig)
