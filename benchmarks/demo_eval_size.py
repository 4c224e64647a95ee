"""How many evaluation texts the demo needs for its intervals to separate the rows it compares.

    .venv/bin/python benchmarks/demo_eval_size.py RUN_FOLDER [--rows lora,hft,budget_merge] [--seed 0]

Reads the per-item scores of a demo run (``RUN_FOLDER/results/base.json`` and one JSON per row, as
``examples/demo.py`` writes them) and asks, for each quantity the demo's table compares (German
target gain and English source retention, each a perplexity ratio to the base), at what number of
texts n per language its 95% intervals would settle the comparison.

The intervals at n come from the plug-in bootstrap: a replicate draws n of the run's items with
replacement and recomputes every row's ratio to the base on that draw (the same draw for every row,
so rows stay paired exactly as in ``eval/intervals.py``), and the percentile interval is taken over
the replicates. Its half-width shrinks as 1/sqrt(n); the last column gives the n that scaling
predicts from the run's own size, as a check on the grid search. Three criteria:

* ``excludes``: a row's interval excludes no change (ratio 1);
* ``apart``: two rows' intervals no longer overlap (what a reader of the demo's table sees);
* ``paired``: the paired interval of the two rows' difference excludes 0 (the sharper test: both
  rows are scored on the same texts).

The point estimates are held at the run's values: this answers "how many texts would separate
differences of this size", not whether the differences are real.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deltawise.eval.intervals import paired_sample  # noqa: E402
from deltawise.eval.results import EvalResult  # noqa: E402

GRID = (30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300, 400, 500, 700, 1000)
LEVEL = 0.95
REPLICATES = 2000


def load(run: Path, label: str) -> EvalResult:
    return EvalResult.model_validate(json.loads((run / "results" / f"{label}.json").read_text()))


def replicates(base: EvalResult, rows: dict[str, EvalResult], role: str, n: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each row's ratio to the base on REPLICATES draws of n items (the same draws for every row)."""
    name = next(d.name for d in base.datasets if d.role == role)
    samples = {lab: paired_sample(r.dataset(name), base.dataset(name)) for lab, r in rows.items()}
    size = len(next(iter(samples.values())).base)
    idx = rng.integers(0, size, size=(REPLICATES, n))
    return {lab: s.replicates(idx)["ratio"] for lab, s in samples.items()}


def interval(x: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(x, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a demo run folder (results/*.json inside)")
    parser.add_argument("--rows", default="lora,hft,budget_merge", help="the rows to compare, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = load(args.run, "base")
    rows = {lab: load(args.run, lab) for lab in args.rows.split(",")}
    quantities = {"target": "German target gain", "source": "English retention"}
    print(f"run: {args.run}; {LEVEL:.0%} percentile intervals, {REPLICATES} replicates, seed {args.seed}")
    for role, title in quantities.items():
        name = next(d.name for d in base.datasets if d.role == role)
        n0 = base.dataset(name).n_items
        shift, spec = (1.0, "+.3f") if role == "target" else (0.0, ".3f")  # gain = ratio - 1, retention = ratio
        grid = sorted({n0, *GRID})
        at = {n: replicates(base, rows, role, n, np.random.default_rng([args.seed, n, 0 if role == "target" else 1]))
              for n in grid}
        point = {lab: _point(r, name) for lab, r in rows.items()}
        ref = at[n0]
        print(f"\n{title} ({name}; the run has n = {n0} items)")
        print(f"  {'compared':<28}{'value(s) at n=' + str(n0):<40}{'criterion':<10}{'n (grid)':>9}{'n (1/√n)':>10}")
        for lab in rows:
            lo, hi = interval(ref[lab])
            v = point[lab]
            need = _first(grid, lambda n: not (interval(at[n][lab])[0] <= 1.0 <= interval(at[n][lab])[1]))
            half = (v - lo) if v > 1 else (hi - v)
            scaled = n0 * (half / abs(v - 1)) ** 2
            shown = f"{v - shift:{spec}} [{lo - shift:{spec}}, {hi - shift:{spec}}]"
            print(f"  {lab + ' vs base':<28}{shown:<40}{'excludes':<10}{need:>9}{scaled:>10.0f}")
        for a, b in combinations(rows, 2):
            va, vb = point[a], point[b]
            hi_lab, lo_lab = (a, b) if va >= vb else (b, a)
            apart = _first(grid, lambda n: interval(at[n][hi_lab])[0] > interval(at[n][lo_lab])[1])
            paired = _first(grid, lambda n: interval(at[n][hi_lab] - at[n][lo_lab])[0] > 0)
            h_apart = (point[hi_lab] - interval(ref[hi_lab])[0]) + (interval(ref[lo_lab])[1] - point[lo_lab])
            d_lo = interval(ref[hi_lab] - ref[lo_lab])[0]
            diff = abs(va - vb)
            shown = f"{point[hi_lab] - shift:{spec}} vs {point[lo_lab] - shift:{spec}}"
            print(f"  {hi_lab + ' > ' + lo_lab:<28}{shown:<40}{'apart':<10}{apart:>9}{n0 * (h_apart / diff) ** 2:>10.0f}")
            print(f"  {'':<28}{'':<40}{'paired':<10}{paired:>9}{n0 * ((diff - d_lo) / diff) ** 2:>10.0f}")


def _point(result: EvalResult, name: str) -> float:
    return next(c.ratio for c in result.forgetting.datasets if c.name == name)


def _first(grid, ok) -> str:
    return next((str(n) for n in grid if ok(n)), f">{grid[-1]}")


if __name__ == "__main__":
    main()
