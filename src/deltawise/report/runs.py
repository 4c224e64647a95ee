"""Find and parse the result JSON files of one or more run folders."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from deltawise.analyze.results import Interpolation, WeightsAnalysis
from deltawise.errors import InputError
from deltawise.eval.results import EvalResult
from deltawise.report.guard import guard_checks
from deltawise.report.training import TrainingRun, is_training_run, load_training_run

KINDS = {"eval": EvalResult, "weights": WeightsAnalysis, "interpolation": Interpolation}


@dataclass
class Runs:
    evals: list[tuple[str, EvalResult]] = field(default_factory=list)  # (label, result)
    weights: list[tuple[str, WeightsAnalysis]] = field(default_factory=list)
    interpolations: list[tuple[str, Interpolation]] = field(default_factory=list)
    trainings: list[tuple[str, TrainingRun]] = field(default_factory=list)  # train outputs (report/training.py)
    skipped: list[str] = field(default_factory=list)  # JSON files that are not deltawise results
    guarded: list[tuple[str, Path, list]] = field(default_factory=list)  # (label, training_log.json, records) of guarded runs

    def empty(self) -> bool:
        return not (self.evals or self.weights or self.interpolations or self.trainings or self.guarded)


def _files(paths: list[Path], runs: Runs) -> list[tuple[str, Path]]:
    found = []
    for p in paths:
        if is_training_run(p):  # an adapter, delta or model that train wrote: its record, not its configs
            runs.trainings.append((p.name, load_training_run(p)))
            _guarded_log(p, runs)
        elif p.is_dir():
            found += [(f"{p.name}/{f.relative_to(p).with_suffix('')}", f) for f in sorted(p.rglob("*.json"))]
        elif p.is_file():
            found.append((p.stem, p))
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


def load_runs(paths: list[Path]) -> Runs:
    runs = Runs()
    for label, f in _files(paths, runs):
        try:
            data = json.loads(f.read_text())
        except ValueError:
            runs.skipped.append(f"{f} (not JSON)")
            continue
        if f.name == "training_log.json" and guard_checks(data):  # a guarded training run (report/guard.py)
            runs.guarded.append((label, f, data))
            continue
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind not in KINDS:
            runs.skipped.append(f"{f} (no deltawise result kind)")
            continue
        try:
            parsed = KINDS[kind].model_validate(data)
        except ValidationError as exc:
            raise InputError(f"{f}: a {kind!r} result that does not match its schema "
                             f"({exc.errors()[0]['msg']} at {exc.errors()[0]['loc']})") from None
        {"eval": runs.evals, "weights": runs.weights, "interpolation": runs.interpolations}[kind].append((label, parsed))
    if runs.empty():
        raise InputError(f"no deltawise results (eval/analyze JSON or train outputs) found in {[str(p) for p in paths]}")
    return runs
