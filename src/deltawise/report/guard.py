"""The report's section for guarded training runs (``train --retain``): retention and target gain over
the training steps, with their intervals and the budget, the written point marked.

Read from ``training_log.json`` (the checks are its records with a ``guard`` entry, adapt/guard.py) and,
beside it, ``deltawise_guard.json`` (the budgets and which point was written, adapt/guarded.py).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any, Optional

from deltawise.report import figures, tables
from deltawise.report.training import guard_checks

LOG = "training_log.json"
RECORD = "deltawise_guard.json"


def _record(log: Path) -> dict[str, Any]:
    try:
        data = json.loads((log.parent / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def trajectory_figure(label: str, checks: list[dict[str, Any]], record: dict[str, Any]) -> Optional[str]:
    """Two panels over the steps: each source's retention (interval bars, lower bound, budget line) and the
    mean target gain (interval bars); the kept step is circled."""
    if not checks:
        return None
    plt = figures.plt
    steps = [r["step"] for r in checks]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for name in checks[0]["guard"]["retention"]:
        values = [r["guard"]["retention"][name] for r in checks]
        cis = [r["guard"]["retention_ci"].get(name) or [v, v] for r, v in zip(checks, values)]
        top.errorbar(steps, values, yerr=[[v - c[0] for v, c in zip(values, cis)], [c[1] - v for v, c in zip(values, cis)]],
                     marker="o", ms=4, capsize=3, lw=1, label=f"retention {name}")
        top.plot(steps, [r["guard"]["retention_lower"][name] for r in checks], ls=":", lw=1, label=f"lower bound {name}")
        budget = (record.get("budgets") or {}).get(name)
        if budget is not None:
            top.axhline(budget, color="#c0504d", lw=1, ls="--", label=f"budget {name} ({budget:g})")
    gains = [r["guard"]["gain"] for r in checks]
    if all(g is not None for g in gains):
        cis = [r["guard"]["gain_ci"] or [g, g] for r, g in zip(checks, gains)]
        bottom.errorbar(steps, gains, yerr=[[g - c[0] for g, c in zip(gains, cis)], [c[1] - g for g, c in zip(gains, cis)]],
                        marker="o", ms=4, capsize=3, lw=1, color="#4f81bd", label="target gain")
    kept = [r for r in checks if r["guard"].get("kept")]
    chosen = record.get("chosen") or {}
    for r in kept:
        mark = "kept (written)" if chosen.get("segment") is None else "kept checkpoint"
        top.plot([r["step"]], [min(r["guard"]["retention"].values())], "o", ms=12, mfc="none", mec="black", label=mark)
        if r["guard"]["gain"] is not None:
            bottom.plot([r["step"]], [r["guard"]["gain"]], "o", ms=12, mfc="none", mec="black")
    over = [r for r in checks if not r["guard"]["feasible"]]
    if over:
        top.plot([r["step"] for r in over], [min(r["guard"]["retention_lower"].values()) for r in over], "x", color="#c0504d",
                 ms=7, label="over budget")
    top.set_ylabel("retention (ratio to base)")
    top.set_title(f"{label}: retention and target gain over training")
    top.legend(fontsize=7)
    bottom.set_ylabel("target gain (ratio − 1)")
    bottom.set_xlabel("optimizer step (bam: round)")
    if chosen.get("segment"):
        bottom.set_title(f"written: {chosen.get('point')}", fontsize=8)
    return figures.to_svg(fig)


def section(trainings: list[tuple[str, Path, list]]) -> list[str]:
    """The report's HTML parts for the guarded runs among ``trainings`` ((label, log file, records)); none when none."""
    parts: list[str] = []
    for label, log, records in trainings:
        checks = guard_checks(records)
        if not checks:
            continue
        record = _record(log)
        chosen = record.get("chosen") or {}
        svg = trajectory_figure(label, checks, record)
        parts.append(f'<figure id="fig-guard-{escape(label)}" class="plot">{svg}<figcaption>'
                     f"{escape(label)}: each check on the monitor split, with its paired bootstrap interval; "
                     f"the circled step was kept. Written: {escape(str(chosen.get('point', 'unknown')))} — "
                     f"{escape(str(chosen.get('why', '')))}</figcaption></figure>")
        rows = [(r["step"], *[r["guard"]["retention"][n] for n in r["guard"]["retention"]],
                 *[r["guard"]["retention_lower"][n] for n in r["guard"]["retention"]], r["guard"]["gain"],
                 "yes" if r["guard"]["feasible"] else "no", "<-" if r["guard"].get("kept") else "") for r in checks]
        names = list(checks[0]["guard"]["retention"])
        parts.append(tables.table(f"table-guard-{label}", ["step", *[f"retention {n}" for n in names],
                                                           *[f"lower bound {n}" for n in names], "target gain",
                                                           "within budget", "kept"], rows))
        held = chosen.get("heldout")
        if held:
            shown = ", ".join(f"{n} {v:.4f}" for n, v in held["retention"].items())
            parts.append(f"<p>Held out: retention {escape(shown)}; target gain {tables.fmt(held.get('gain'))}; "
                         f"{'meets' if held.get('within_budget') else 'does not meet'} the budget.</p>")
    return (["<h2>Training with a forgetting budget</h2>"] + parts) if parts else []
