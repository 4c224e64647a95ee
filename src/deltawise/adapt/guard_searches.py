"""After training, ``train --retain ... --interpolate`` searches two segments (adapt/interpolate.py), which on a
large model takes minutes to hours. Training's output is then already in place (the kept checkpoint, with a record
marked "not finished", adapt/guarded.py), and the run's work folder beside it (``work_folder``: one per output,
locked while in use) holds what the searches need: the final step's weights (FINAL) and TRAINED, the guard's state at
the end of training with the run's key. A run interrupted there keeps that folder; rerun with ``--resume`` and it
searches again without retraining (after checking that the command, the base, the data and the written checkpoint
are those of the finished training), or with ``--overwrite`` to train again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from deltawise.adapt.checkpoints import changed_parts, run_key
from deltawise.adapt.guard import TRAIN_RECORD, GuardPoint, GuardState, RetentionGuard
from deltawise.adapt.guard_resume import guard_key
from deltawise.adapt.train import TrainConfig, TrainResult
from deltawise.errors import OutputError
from deltawise.io.reader import ModelReader
from deltawise.io.writer import write_json_atomic

TRAINED = "deltawise_trained.json"  # in the work folder: training finished, the searches are to run
TRAINED_SCHEMA = "deltawise.guard_trained/1"
FINAL = "final"  # in the work folder: the final step's weights, saved by the guard for --interpolate


def work_folder(out: Path) -> Path:
    """The guarded run's work folder for ``out`` (the splits, the final weights, TRAINED): one name per output, so a
    rerun finds what an interrupted one left, and no killed run leaves a stray folder of its own."""
    return out.parent / f".{out.name}.guard"


def interrupted_searches(out: Path) -> bool:
    """Whether a guarded run of ``out`` finished training and was interrupted in its searches: a rerun with
    ``resume=True`` runs them without retraining (for a caller that reruns a command until it finishes)."""
    return (work_folder(out) / TRAINED).is_file()


def searches_key(cfg: TrainConfig, guard: RetentionGuard, model_path: Path) -> dict[str, Any]:
    """What the searches after training depend on: the training run's key (options, base weights, data) and the
    guard's. ``--interpolate-refine`` is not part of it: the searches run again in full."""
    fingerprint = ModelReader(model_path, allow_pickle=cfg.allow_pickle, label=str(cfg.model)).fingerprint()
    key = run_key(cfg, dict(cfg.method_params or {}), fingerprint)
    return {**key, "guard": guard_key(guard)}


def _sha256(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def save_trained(work: Path, key: dict[str, Any], state: GuardState, result: TrainResult) -> None:
    """TRAINED: the guard's state and the training result at the end of training, the run's key, and a checksum of
    the output's training record (the checkpoint the searches start from must still be the one written)."""
    write_json_atomic(work / TRAINED, {
        "schema": TRAINED_SCHEMA, "key": key, "output_record_sha256": _sha256(result.output / TRAIN_RECORD),
        "state": {**asdict(state), "points": [asdict(p) for p in state.points]},
        "train": {**asdict(result), "output": str(result.output)},
    })


def load_trained(work: Path, key: dict[str, Any], out: Path) -> tuple[GuardState, TrainResult]:
    """The state ``save_trained`` wrote, once the command, base, data and written checkpoint are checked to be the
    finished training's; OutputError naming what differs."""
    path = work / TRAINED
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise OutputError(f"{path} cannot be read: remove {work} and rerun with --overwrite to train again") from None
    if saved.get("schema") != TRAINED_SCHEMA:
        raise OutputError(f"{path}: not a record this version reads (schema {saved.get('schema')!r}); remove {work} and "
                          "rerun with --overwrite to train again")
    changed = changed_parts(saved["key"], key)
    if changed:
        raise OutputError(f"{work} holds a finished training that differs in: {changed}; rerun it as it was, or rerun with "
                          "--overwrite (without --resume) to train again")
    if _sha256(out / TRAIN_RECORD) != saved["output_record_sha256"] or not (work / FINAL).is_dir():
        raise OutputError(f"{out} is no longer the checkpoint the interrupted run wrote (or its final weights in {work} are "
                          "gone): rerun with --overwrite (without --resume) to train again")
    state = saved["state"]
    points = [GuardPoint(**p) for p in state.pop("points")]
    train = saved["train"]
    return GuardState(points=points, **state), TrainResult(**{**train, "output": Path(train["output"])})
