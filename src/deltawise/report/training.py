"""Training runs in the report: a folder that ``train`` wrote (an adapter, a delta or a whole model).

Such a folder, given to ``report`` as a run, adds one row to the report's training table from the
record ``train`` keeps beside its output (``deltawise_train.json``: method, base, task, steps,
trainable parameters, seconds) and its log (``training_log.json``: the loss per logged step). Its
other JSON files (adapter and tokenizer configs) are part of the model, not results, so they are
not listed as skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from deltawise.delta.labels import TRAIN_RECORD
from deltawise.errors import InputError

TRAINING_LOG = "training_log.json"


@dataclass
class TrainingRun:
    folder: Path
    method: str
    kind: str  # peft | delta | full
    base_model: str
    task: str
    steps: Optional[int]
    trainable_params: Optional[int]
    total_params: Optional[int]
    seconds: Optional[float]
    first_loss: Optional[float]
    last_loss: Optional[float]
    labels: list[str]


def is_training_run(path: Path) -> bool:
    return path.is_dir() and (path / TRAIN_RECORD).is_file()


def load_training_run(folder: Path) -> TrainingRun:
    try:
        record = json.loads((folder / TRAIN_RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder / TRAIN_RECORD}: not a readable training record ({exc})") from None
    if not isinstance(record, dict) or "method" not in record:
        raise InputError(f"{folder / TRAIN_RECORD}: not a deltawise training record (no 'method')")
    try:
        log = json.loads((folder / TRAINING_LOG).read_text())
    except (OSError, ValueError):
        log = []
    losses = [float(r["loss"]) for r in log if isinstance(r, dict) and isinstance(r.get("loss"), (int, float))]
    labels = record.get("label2id") or {}
    return TrainingRun(
        folder=folder, method=str(record["method"]), kind=str(record.get("kind", "")),
        base_model=str(record.get("base_model", "")), task=str(record.get("task", "")), steps=record.get("steps"),
        trainable_params=record.get("trainable_params"), total_params=record.get("total_params"),
        seconds=record.get("seconds"), first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
        labels=sorted(labels, key=lambda name: labels[name]) if isinstance(labels, dict) else [],
    )


def training_rows(runs: list[tuple[str, TrainingRun]]) -> list[tuple[object, ...]]:
    """One row per run: what was trained, on what, how long, and the loss at the first and last logged step."""
    rows = []
    for label, r in runs:
        share = (f"{r.trainable_params:,} ({100 * r.trainable_params / r.total_params:.3g}%)"
                 if r.trainable_params is not None and r.total_params else r.trainable_params)
        rows.append((label, r.method, r.kind, r.base_model, r.task + (f" ({', '.join(r.labels)})" if r.labels else ""),
                     r.steps, share, r.seconds, r.first_loss, r.last_loss))
    return rows


TRAINING_HEADER = ["run", "method", "output", "base", "task", "steps", "trainable", "seconds", "first loss", "last loss"]


def guard_checks(records: Any) -> list[dict[str, Any]]:
    """The guard's checks among a training log's records, by step (empty for an unguarded run's log)."""
    if not isinstance(records, list):
        return []
    return sorted((r for r in records if isinstance(r, dict) and isinstance(r.get("guard"), dict)), key=lambda r: r["step"])
