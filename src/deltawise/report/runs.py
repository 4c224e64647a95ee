"""Find and parse the result JSON files of one or more run folders, and give each a short label."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from deltawise.analyze.results import Interpolation, WeightsAnalysis
from deltawise.errors import InputError
from deltawise.eval.results import Bounds, EvalResult, Forgetting
from deltawise.report.training import TrainingRun, guard_checks, is_training_run, load_training_run

BUDGET_SCHEMA = "deltawise.budget/"  # written by search/budget.py (`deltawise budget`, the demo); it has no "kind"


class SearchedPoint(BaseModel):
    """One point of a retention-budget search, scored on the selection split."""

    params: dict[str, Any]
    retention: dict[str, float]
    retention_lower: dict[str, float] = {}
    retention_min: float
    target: dict[str, float]
    target_score: float
    intervals: dict[str, Bounds] = {}
    feasible: bool
    pareto: bool = False


class HeldoutReport(BaseModel):
    retention: dict[str, float]
    retention_ci: dict[str, Optional[Bounds]] = {}
    target: dict[str, float]
    target_ci: dict[str, Optional[Bounds]] = {}
    within_budget: bool
    forgetting: Optional[Forgetting] = None


class BudgetSearch(BaseModel):
    """The parts of a budget search's JSON the report shows."""

    method: str
    grid: dict[str, list[Any]]
    budgets: dict[str, float]
    candidates: list[SearchedPoint]
    chosen: Optional[int] = None
    output: Optional[str] = None
    heldout: Optional[HeldoutReport] = None
    intervals: dict[str, Any] = {}


@dataclass
class Runs:
    evals: list[tuple[str, EvalResult]] = field(default_factory=list)  # (label, result)
    weights: list[tuple[str, WeightsAnalysis]] = field(default_factory=list)
    interpolations: list[tuple[str, Interpolation]] = field(default_factory=list)
    budgets: list[tuple[str, BudgetSearch]] = field(default_factory=list)
    trainings: list[tuple[str, TrainingRun]] = field(default_factory=list)  # train outputs (report/training.py)
    guarded: list[tuple[str, Path, list]] = field(default_factory=list)  # (label, training_log.json, records) of guarded runs
    skipped: list[str] = field(default_factory=list)  # JSON files that are not deltawise results
    sources: dict[str, str] = field(default_factory=dict)  # label -> the full path of its file

    def empty(self) -> bool:
        return not (self.evals or self.weights or self.interpolations or self.budgets or self.trainings or self.guarded)

    def model_label(self, model: str) -> str:
        """A model path as the label of the run that evaluated it (``base``), else its folder name."""
        return next((lab for lab, r in self.evals if r.model == model), Path(model).name or model)


KINDS = {"eval": EvalResult, "weights": WeightsAnalysis, "interpolation": Interpolation, "budget": BudgetSearch}


def _files(paths: list[Path], runs: Runs) -> list[Path]:
    found = []
    for p in paths:
        if is_training_run(p):  # an adapter, delta or model that train wrote: its record, not its configs
            runs.trainings.append((p.name, load_training_run(p)))
            runs.sources[p.name] = str(p)
            _guarded_log(p, runs)
        elif p.is_dir():
            found += sorted(p.rglob("*.json"))
        elif p.is_file():
            found.append(p)
        else:
            raise InputError(f"run {str(p)!r} not found")
    return found


def _guarded_log(folder: Path, runs: Runs) -> None:
    """The retention checks of a guarded train output (its training_log.json), for report/guard.py."""
    log = folder / "training_log.json"
    try:
        data = json.loads(log.read_text()) if log.is_file() else None
    except ValueError:
        return
    if data is not None and guard_checks(data):
        runs.guarded.append((folder.name, log, data))


def short_labels(paths: list[Path]) -> list[str]:
    """The shortest path suffix (without ``.json``) that tells each file from the others.

    ``runs/lora.json`` and ``runs/hft.json`` are ``lora`` and ``hft``; ``a/ft/eval.json`` and ``b/ft/eval.json``
    are ``a/ft`` and ``b/ft``: a file name that every colliding file shares (``eval.json`` in each run folder)
    is dropped, as its folders name the run.
    """
    parts = [p.resolve().with_suffix("").parts for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != i and p != mine]
        k = 1
        while k < len(mine) and any(o[-k:] == mine[-k:] for o in others):
            k += 1
        # k > 1 only when another file has this file's name: then the folders name the run
        labels.append("/".join(mine[-k:-1] if k > 1 else mine[-1:]))
    # the dropped file name can make two labels equal again (a/eval.json beside a.json): keep those whole
    return [lab if labels.count(lab) == 1 else "/".join(parts[i][-len(lab.split("/")) - 1 :])
            for i, lab in enumerate(labels)]


def _kind(data: object) -> Optional[str]:
    if not isinstance(data, dict):
        return None
    if str(data.get("schema", "")).startswith(BUDGET_SCHEMA):
        return "budget"
    kind = data.get("kind")
    return kind if kind in KINDS else None


def load_runs(paths: list[Path]) -> Runs:
    runs = Runs()
    parsed: list[tuple[str, Path, Any]] = []
    for f in _files(paths, runs):
        try:
            data = json.loads(f.read_text())
        except ValueError:
            runs.skipped.append(f"{f} (not JSON)")
            continue
        if f.name == "training_log.json" and guard_checks(data):  # a guarded training run (report/guard.py)
            runs.guarded.append((f.parent.name, f, data))
            continue
        kind = _kind(data)
        if kind is None:
            runs.skipped.append(f"{f} (no deltawise result kind)")
            continue
        try:
            parsed.append((kind, f, KINDS[kind].model_validate(data)))
        except ValidationError as exc:
            raise InputError(f"{f}: a {kind!r} result that does not match its schema "
                             f"({exc.errors()[0]['msg']} at {exc.errors()[0]['loc']})") from None
    lists = {"eval": runs.evals, "weights": runs.weights, "interpolation": runs.interpolations, "budget": runs.budgets}
    for label, (kind, f, result) in zip(short_labels([f for _, f, _ in parsed]), parsed):
        lists[kind].append((label, result))
        runs.sources[label] = str(f)
    if runs.empty():
        raise InputError(f"no deltawise results (eval/analyze/budget JSON or train outputs) found in {[str(p) for p in paths]}")
    return runs
