"""Matplotlib figures rendered to inline SVG text (no files, no network)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display here, and no GUI toolkit may be imported
import matplotlib.pyplot as plt  # noqa: E402

from deltawise.analyze.results import Interpolation, WeightsAnalysis  # noqa: E402
from deltawise.eval.results import EvalResult  # noqa: E402

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


def tradeoff(evals: list[tuple[str, EvalResult]]) -> str | None:
    points = [(lab, r.forgetting) for lab, r in evals
              if r.forgetting and r.forgetting.target_gain is not None and r.forgetting.source_retention is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    for lab, f in points:
        # interval bars where the run has them (paired bootstrap, eval/intervals.py)
        xerr = (None if f.target_gain_ci is None
                else [[f.target_gain - f.target_gain_ci[0]], [f.target_gain_ci[1] - f.target_gain]])
        yerr = (None if f.source_retention_ci is None
                else [[f.source_retention - f.source_retention_ci[0]], [f.source_retention_ci[1] - f.source_retention]])
        ax.errorbar(f.target_gain, f.source_retention, xerr=xerr, yerr=yerr, fmt="o", ms=6, capsize=3, lw=1)
        ax.annotate(lab, (f.target_gain, f.source_retention), textcoords="offset points", xytext=(4, 4), fontsize=8)
    _label(ax, "target gain (mean ratio to base − 1; > 0 is better)", "source retention (mean ratio to base; 1 = nothing lost)",
           "Trade-off: what each run gained vs what it kept")
    return to_svg(fig)


def interpolation(curves: list[tuple[str, Interpolation]]) -> str | None:
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, c in curves:
        ax.plot(c.lambdas, c.loss, marker="o", ms=3, label=f"{c.model_a.name} → {c.model_b.name} (barrier {c.barrier:.3g})")
    _label(ax, "λ  (0 = model A, 1 = model B)", "loss (mean NLL per token)", "Linear interpolation curves", legend=True)
    return to_svg(fig)


def layer_deltas(analyses: list[tuple[str, WeightsAnalysis]]) -> str | None:
    if not analyses:
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    for lab, a in analyses:
        for i, m in enumerate(a.models):
            ys = [t.deltas[i].relative or 0.0 for t in a.tensors]
            ax.plot(range(len(ys)), ys, marker=".", lw=1, label=f"{lab}: {m.name}")
    ax.set_yscale("log")
    _label(ax, "tensor (sorted by name)", "‖ΔW‖ / ‖W₀‖", "Relative size of each tensor's delta", legend=True)
    return to_svg(fig)


def intruder_counts(analyses: list[tuple[str, WeightsAnalysis]]) -> str | None:
    bars = [(f"{lab}: {m.model}", m.intruders) for lab, a in analyses for m in a.summary.models if m.matrices]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(bars)))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#c0504d")
    _label(ax, "intruder dimensions (summed over matrices)", "", "Intruder dimensions per model")
    ax.invert_yaxis()
    return to_svg(fig)
