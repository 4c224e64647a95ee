"""``deltawise repair``: win back what a delta forgot with cheap weight-space edits, under a retention budget.

The edits (search/repair_edits.py): a global scale of the delta, removing the delta's component along
the fine-tuned matrices' intruder dimensions, and one scale per tensor group (embeddings, attention
and MLP of the early and late layers, the rest). Every point is the base plus an edited delta,
applied in memory and scored with ``eval``'s ``score_dataset``; retention and target are ratios
against the base, as in the retention-budget merge (search/budget.py), which this shares its rules
with: choose on a selection split with the one-sided lower confidence bound of each retention,
report the written model on the held-out split with paired bootstrap intervals.

The search is a coordinate search from the delta as given: ``rounds`` passes over the coordinates,
each tried over its values with the others held at the best point so far (the incumbent):

1. the intruder removal over ``intruder_levels`` (skipped when no matrix has an intruder), first
   because it targets one known pathology of fine-tuning and leaves the rest of the delta alone;
2. the global scale over ``scales``;
3. each group the delta touches, its factor over ``group_scales``.

A point beats the incumbent when it is feasible and the incumbent is not, or both are feasible and
its target score is higher, or neither is and its worst retention margin (lower bound minus budget)
is larger. So the search first walks towards the budget, then along it towards gain. With the
defaults the first round scores exactly 1 + 2 + 3 + 2·G points (the delta as given, then each
coordinate's values but its current one, which is already scored; G ≤ 6 groups): at most 18
evaluations of the selection split, known in advance. A coordinate search rather than CMA-ES: the parameters are few,
bounded and nearly separable (a group's scale matters through its own tensors), the values tried are
round numbers a user can read and reuse, the evaluation count is fixed, and it adds no dependency.

The chosen point is the feasible point with the highest target score among all evaluated points
(not only the incumbent's path), as in the budget merge; the Pareto front is over (smallest
retention, target score) of every point.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from deltawise.data.read import load_items
from deltawise.errors import InputError
from deltawise.eval.forgetting import forgetting
from deltawise.eval.models import LoadedModel, load_model
from deltawise.eval.results import EvalResult
from deltawise.eval.runner import REQUIRED, detect_task, evaluate, score_dataset, unique_names
from deltawise.io.output import check_output_folder, staged_output
from deltawise.io.resolve import resolve_model
from deltawise.io.writer import write_json_atomic
from deltawise.search.budget import BudgetResult, Candidate, most_retentive, pareto_front
from deltawise.search.budgeted import BudgetedOptions
from deltawise.search.repair_edits import INTRUDERS, SCALE, DeltaEdits
from deltawise.search.scoring import as_result
from deltawise.search.splits import Split

SCHEMA = "deltawise.repair/1"
REPORT = "deltawise_repair.json"


@dataclass
class RepairOptions(BudgetedOptions):
    """The budgets, targets, splits and scoring of ``BudgetedOptions`` (progress counts "evaluations"), and the edits."""

    scales: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    intruder_levels: tuple[float, ...] = (0.5, 1.0)
    group_scales: tuple[float, ...] = (0.0, 0.5, 1.0)
    rounds: int = 1
    intruder_k: int = 10
    intruder_eps: float = 0.5
    most_retentive: bool = False
    overwrite: bool = False

    target_use: ClassVar[str] = "whose gain repair should keep"

    def check(self) -> None:
        super().check()
        for label, values in (("--scales", self.scales), ("--intruder-levels", self.intruder_levels),
                              ("--group-scales", self.group_scales)):
            if not values or any(not 0.0 <= v <= 1.0 for v in values):
                raise InputError(f"{label} takes values in [0, 1] (fractions of the delta), got {list(values)}")


@dataclass
class RepairResult(BudgetResult):
    """The budget search's result (every point, Pareto front, choice, held-out report) plus what the edits touch."""

    groups: dict[str, list[str]] = field(default_factory=dict)  # tensor group -> the parameters in it
    intruder_dimensions: dict[str, int] = field(default_factory=dict)  # matrix -> intruders found

    def to_json(self) -> dict[str, Any]:
        found = super().to_json()
        found["schema"] = SCHEMA
        found["definition"] = "point = base + scale * group factor * (delta - intruders * its intruder component); " + \
            found["definition"]
        return {**found, "groups": self.groups, "intruder_dimensions": self.intruder_dimensions}


class _Scorer:
    """Scores the working model on the selection split against the base, and keeps every point."""

    def __init__(self, lm: LoadedModel, edits: DeltaEdits, splits: list[Split], options: RepairOptions):
        self.lm, self.edits, self.o = lm, edits, options
        n = len(options.retain)
        names = unique_names([b.data for b in options.retain] + list(options.targets))
        self.source_names, self.target_names = names[:n], names[n:]
        self.budgets = dict(zip(self.source_names, (b.minimum for b in options.retain)))
        self.files = [(s.selection, name, "source" if i < n else "target") for i, (s, name) in enumerate(zip(splits, names))]
        self.candidates: list[Candidate] = []
        self.seen: dict[tuple, int] = {}
        self.tell = options.note or (lambda _m: None)
        self.baseline = self._score("base")

    def _score(self, label: str) -> EvalResult:
        window = self.o.eval.max_length or min(self.lm.context_length, 1024)
        datasets = []
        for path, name, role in self.files:
            items = load_items(path, require=())
            task = detect_task(items)
            if task == "classification":
                raise InputError(f"{path}: repair scores causal language models (text or multiple choice), not classifiers")
            datasets.append(score_dataset(self.lm, load_items(path, require=REQUIRED[task]), task, name=name, role=role,
                                          path=str(path), max_length=window, stride=max(window // 2, 1),
                                          batch_size=self.o.eval.batch_size))
        return as_result(label, datasets)

    def point(self, params: dict[str, Any]) -> Candidate:
        key = tuple(sorted(params.items()))
        if key in self.seen:
            return self.candidates[self.seen[key]]
        self.edits.apply(params)
        comps = {c.name: c for c in forgetting(self._score("candidate"), self.baseline, self.o.intervals).datasets}
        cand = Candidate(dict(params), {n: comps[n].ratio for n in self.source_names},
                         {n: comps[n].ratio for n in self.target_names}, {n: comps[n].model for n in comps})
        cand.retention_lower = {n: comps[n].ratio if comps[n].ratio_lower is None else comps[n].ratio_lower
                                for n in self.source_names}
        cand.intervals = {n: list(c.ratio_ci) for n, c in comps.items() if c.ratio_ci is not None}
        cand.feasible = all(cand.retention_lower[n] >= self.budgets[n] for n in self.source_names)
        self.seen[key] = len(self.candidates)
        self.candidates.append(cand)
        shown = ", ".join(f"{k}={v:g}" for k, v in params.items())
        self.tell(f"{shown}: retention {cand.retention_min:.4f} (lower bound {min(cand.retention_lower.values()):.4f}), "
                  f"target {cand.target_score:.4f}{'' if cand.feasible else ' (over budget)'}")
        return cand

    def key(self, c: Candidate) -> tuple:
        """The coordinate search's order: feasible first, then target; infeasible by the worst margin."""
        if c.feasible:
            return (1, c.target_score, c.retention_min)
        return (0, min(c.retention_lower[n] - self.budgets[n] for n in self.source_names), c.target_score)


def planned_evaluations(edits: DeltaEdits, options: RepairOptions) -> int:
    """The points the search scores: exact for the first round (each coordinate is tried once, from its identity
    value, which is already scored), an upper bound for later ones (a point scored before is not scored again)."""
    identity = edits.identity()
    coordinates = _coordinates(edits, options)
    first = sum(len({float(v) for v in values} - {identity[name]}) for name, values in coordinates)
    return 1 + first + (options.rounds - 1) * sum(len(set(values)) for _, values in coordinates)


def _coordinates(edits: DeltaEdits, options: RepairOptions) -> list[tuple[str, tuple[float, ...]]]:
    coordinates = ([(INTRUDERS, options.intruder_levels)] if edits.intruder_part else []) + [(SCALE, options.scales)]
    return coordinates + [(group, options.group_scales) for group in edits.present_groups()]


def coordinate_search(scorer: _Scorer, options: RepairOptions) -> list[Candidate]:
    """The coordinate search of the module docstring; every evaluated point is in ``scorer.candidates``."""
    edits = scorer.edits
    total = planned_evaluations(edits, options)
    tick = options.progress or (lambda _s, _d, _t: None)
    coordinates = _coordinates(edits, options)
    incumbent = scorer.point(edits.identity())  # the delta as given: its retention and gain, the search's start
    tick("evaluations", len(scorer.candidates), total)
    for _ in range(options.rounds):
        for name, values in coordinates:
            best = incumbent
            for value in values:
                cand = scorer.point({**incumbent.params, name: float(value)})
                tick("evaluations", len(scorer.candidates), total)
                if scorer.key(cand) > scorer.key(best):
                    best = cand
            incumbent = best
    return scorer.candidates


def _chosen(cands: list[Candidate]) -> Optional[int]:
    feasible = [i for i, c in enumerate(cands) if c.feasible]
    return max(feasible, key=lambda i: (cands[i].target_score, cands[i].retention_min, -i)) if feasible else None


def run_repair(delta: str, base: str, out: str | Path, options: RepairOptions) -> RepairResult:
    """Search, write the chosen point's model to ``out`` (atomic) with ``deltawise_repair.json``, report it on the
    held-out split. Raises ``BudgetNotMet`` (with every point) when no point meets the budget."""
    out = Path(out)
    options.check()
    delta_path, base_path = resolve_model(delta), resolve_model(base)
    check_output_folder(out, [("delta", delta_path), ("base", base_path)], options.overwrite)
    common = dict(dtype=options.eval.dtype, device=options.eval.device, trust_remote_code=options.eval.trust_remote_code)
    tell = options.note or (lambda _m: None)
    tell("loading the base and the delta; finding intruder dimensions")
    working = load_model(base, **common)
    fine_tuned = load_model(delta, base=base, **common)
    edits = DeltaEdits.between(working.model, fine_tuned.model, intruder_k=options.intruder_k, intruder_eps=options.intruder_eps)
    del fine_tuned
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.repair-splits-", dir=out.parent))
    try:
        splits = options.splits(folder)
        with torch.no_grad():
            edits.apply({SCALE: 0.0})  # the base itself: the baseline
            scorer = _Scorer(working, edits, splits, options)
            cands = coordinate_search(scorer, options)
        for i in pareto_front([(c.retention_min, c.target_score) for c in cands]):
            cands[i].pareto = True
        result = RepairResult(
            method="repair", grid=_tried(cands), budgets=scorer.budgets, baseline=str(base),
            baseline_values={d.name: d.value for d in scorer.baseline.datasets}, candidates=cands, chosen=_chosen(cands),
            splits=[s.to_json() for s in splits], intervals=options.intervals.describe(),
            groups={g: sorted(n for n, grp in edits.groups.items() if grp == g) for g in edits.present_groups()},
            intruder_dimensions=dict(edits.intruder_counts))
        if result.chosen is None:
            result.chosen = most_retentive(result, options.most_retentive, tell, point="repair point",
                                           remedy="lower the budget or pass --most-retentive")
        edits.apply(cands[result.chosen].params)
        with staged_output(out, options.overwrite) as staging:
            working.model.save_pretrained(staging, safe_serialization=True)
            working.tokenizer.save_pretrained(staging)
            tell("evaluating the written model on the held-out split")
            result.heldout = heldout_report(staging, base, splits, scorer, options)
            result.out = out
            write_json_atomic(staging / REPORT, result.to_json())
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _tried(cands: list[Candidate]) -> dict[str, list[Any]]:
    names = list(cands[0].params) if cands else []
    return {n: sorted({c.params[n] for c in cands}) for n in names}


def heldout_report(model: Path, base: str, splits: list[Split], scorer: _Scorer, options: RepairOptions) -> dict[str, Any]:
    """The written model (read back from disk) against the base on the held-out split: the numbers to report."""
    n = len(options.retain)
    sources, targets = [s.heldout for s in splits[:n]], [s.heldout for s in splits[n:]]
    f = forgetting(evaluate(str(model), sources, targets, options.eval), evaluate(base, sources, targets, options.eval),
                   options.intervals)
    return {
        "retention": {c.name: c.ratio for c in f.datasets if c.role == "source"},
        "retention_ci": {c.name: c.ratio_ci for c in f.datasets if c.role == "source"},
        "target": {c.name: c.ratio for c in f.datasets if c.role == "target"},
        "target_ci": {c.name: c.ratio_ci for c in f.datasets if c.role == "target"},
        "within_budget": all(c.ratio >= scorer.budgets[c.name] for c in f.datasets if c.role == "source"),
        "forgetting": f.model_dump(),
    }


def describe(params: dict[str, Any]) -> str:
    """A point as its departures from the delta as given: ``scale 0.5, intruders 1, mlp_late 0``."""
    identity = {SCALE: 1.0, INTRUDERS: 0.0}
    changed = [f"{name} {value:g}" for name, value in params.items() if value != identity.get(name, 1.0)]
    return ", ".join(changed) or "the delta as given"


def repair_table(result: RepairResult):
    """Every evaluated point as a rich table, in search order: Pareto points starred, the chosen one marked."""
    from rich.table import Table

    table = Table(title=f"repair: points scored on the selection split (retention against {result.baseline})")
    table.add_column("edit", overflow="fold")
    for name, minimum in result.budgets.items():
        table.add_column(f"retention {name} \\[lower bound ≥ {minimum:g}]", justify="right")
    for name in result.candidates[0].target if result.candidates else []:
        table.add_column(f"target {name}", justify="right")
    for col in ("within budget", "Pareto", "chosen"):
        table.add_column(col, justify="center")
    for i, c in enumerate(result.candidates):
        table.add_row(describe(c.params), *[f"{c.retention[n]:.4f} [{c.retention_lower[n]:.4f}]" for n in result.budgets],
                      *[f"{v:.4f}" for v in c.target.values()],
                      "yes" if c.feasible else "no", "*" if c.pareto else "", "<-" if i == result.chosen else "")
    level = result.intervals.get("level", 0.95)
    table.caption = ("retention and target: ratio to the base (ppl_base/ppl, acc/acc_base); > 1 is better; "
                     f"\\[lower bound]: one-sided {level:.0%} paired bootstrap bound, which must clear the budget")
    return table
