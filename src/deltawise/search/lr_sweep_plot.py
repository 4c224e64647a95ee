"""The learning-rate sweep's figure: target gain against retention per rate, on the held-out split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display here, and no GUI toolkit may be imported
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from deltawise.search.lr_sweep import SweepResult


def _err(value: float, ci) -> list[list[float]] | None:
    return None if ci is None else [[value - ci[0]], [ci[1] - value]]


def plot_sweep(result: "SweepResult", path: Path) -> Path:
    """One point per rate: x the mean target ratio, y the smallest retention, with their held-out intervals;
    the budget as a line, the recommended rate ringed. Written atomically (a temporary file renamed)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    budget = min(result.budgets.values())
    ax.axhline(budget, color="tab:red", lw=0.9, ls="--", label=f"retention budget ({budget:g})")
    for i, p in enumerate(result.points):
        held = p.heldout
        target_name = next(iter(held["target"]))  # intervals are per dataset: the first target's are drawn
        source = min(held["retention"], key=held["retention"].get)
        x, y = sum(held["target"].values()) / len(held["target"]), held["retention"][source]
        xerr = _err(held["target"][target_name], held["target_ci"][target_name]) if len(held["target"]) == 1 else None
        ax.errorbar(x, y, xerr=xerr, yerr=_err(y, held["retention_ci"][source]), fmt="o", ms=6, capsize=3, lw=1,
                    color="tab:blue" if p.feasible else "tab:grey")
        ax.annotate(f"lr {p.lr:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if i == result.recommended:
            ax.plot([x], [y], "o", ms=14, mfc="none", mec="tab:green", mew=2, label=f"recommended: lr {p.lr:g}")
    ax.set_xlabel("target: ratio to the base (ppl_base/ppl; > 1 gained)")
    ax.set_ylabel("retention: smallest ratio to the base (1 = nothing lost)")
    ax.set_title("Learning-rate sweep on the held-out split (grey: over budget on the selection split)", fontsize=9)
    ax.legend(fontsize=7)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
