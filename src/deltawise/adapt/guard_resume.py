"""The retention guard's state in a training checkpoint, so that ``train --retain ... --resume`` keeps the same
checkpoint and trajectory as an uninterrupted run.

Trainer's checkpoint (``_trainer/checkpoint-STEP``, adapt/checkpoints.py) restores the weights, optimizer and RNG
states; the guard adds what it learnt up to STEP (it is written before Trainer's files, which mark the checkpoint
complete):

    GUARD_STATE  JSON: the checks (points), the interval in force at each, the patience counter, the steps since
                 the last check, the times, the frozen parameters' checksums and the baseline's per-item scores on
                 both splits (on resume the model holds STEP's weights, not the base's)
    GUARD_KEPT   safetensors: the kept weights (absent while nothing is kept)

A resumed guard skips the baseline, continues from these, and ends as the uninterrupted run ends: with a fixed
``--monitor-every`` it checks at the same steps, so its points are the same numbers (the weights are bit-identical,
adapt/checkpoints.py). The guard's settings are part of the run key (``guard_key``): a resume with other budgets,
splits or checks is refused, as is resuming a guarded run without ``--retain`` or the reverse.

After training, ``--interpolate`` searches two segments (adapt/interpolate.py), which on a large model takes minutes
to hours. Training's output is then already in place (the kept checkpoint, with a record marked "not finished"),
and the run's work folder beside it (``work_folder``: one per output, locked while in use) holds what the searches
need: the final step's weights and TRAINED, the guard's state at the end of training with the run's key. A run
interrupted there keeps that folder; rerun with ``--resume`` and it searches again without retraining (after
checking that the command, the base, the data and the written checkpoint are those of the finished training), or
with ``--overwrite`` to train again.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from deltawise.errors import OutputError
from deltawise.eval.results import EvalResult
from deltawise.io.writer import write_json_atomic

if TYPE_CHECKING:
    from deltawise.adapt.guard import GuardState, RetentionGuard
    from deltawise.adapt.train import TrainConfig, TrainResult

GUARD_STATE = "deltawise_guard_state.json"
GUARD_KEPT = "deltawise_guard_kept.safetensors"
SCHEMA = "deltawise.guard_state/1"
TRAINED = "deltawise_trained.json"  # in the work folder: training finished, the searches are to run
TRAINED_SCHEMA = "deltawise.guard_trained/1"
FINAL = "final"  # in the work folder: the final step's weights, saved by the guard for --interpolate


def _ids_sha(ids) -> str:
    return hashlib.sha256("\0".join(ids).encode()).hexdigest()


def guard_key(guard: RetentionGuard) -> dict[str, Any]:
    """Everything the guard's decisions depend on, JSON-normalised (compared with the interrupted run's)."""
    splits = [{"name": n, "monitor": _ids_sha(s.selection_ids), "heldout": _ids_sha(s.heldout_ids)}
              for n, s in zip(guard.data.names, guard.data.splits)]
    key = {"budgets": guard.data.budgets, "splits": splits, "monitor_every": guard.every, "share": guard.share,
           "stop_early": guard.stop_early, "patience": guard.patience, "max_length": guard.max_length,
           "batch_size": guard.batch_size, "intervals": guard.intervals.describe(), "interpolate": guard.final_to is not None}
    return json.loads(json.dumps(key, default=str))


def save_guard(guard: RetentionGuard, folder: Path) -> None:
    """Write the guard's state into the checkpoint ``folder`` (rank 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    if guard.kept_weights is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in guard.kept_weights.items()}, str(folder / GUARD_KEPT))
    s = guard.state
    write_json_atomic(folder / GUARD_STATE, {
        "schema": SCHEMA,
        "points": [asdict(p) for p in s.points], "every": s.every, "stopped_early_at": s.stopped_early_at,
        "monitor_seconds": s.monitor_seconds, "train_seconds": s.train_seconds,
        "since_check": guard._since_check, "check_cost": guard._check_cost,
        "best_gain": None if guard._best_gain == -math.inf else guard._best_gain, "no_gain_checks": guard._no_gain_checks,
        "frozen_sums": {n: list(v) for n, v in guard._frozen_sums.items()},
        "baseline": guard.baseline.model_dump(mode="json") if guard.baseline is not None else None,
        "baseline_heldout": guard.baseline_heldout.model_dump(mode="json") if guard.baseline_heldout is not None else None,
        "kept_weights": guard.kept_weights is not None,
    })


def load_guard(guard: RetentionGuard, folder: Path, point: type) -> None:
    """Put the state ``save_guard`` wrote into ``guard`` (every process; the kept weights only on rank 0). ``point``:
    the guard's check record (adapt/guard.py's GuardPoint, passed in so that this module needs nothing from there
    at run time)."""
    from deltawise.adapt.dist import rank

    path = folder / GUARD_STATE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise OutputError(f"{folder} holds no retention guard state ({GUARD_STATE}): it was not written by a run with "
                          "--retain; rerun without --resume (remove the staging folder) to start again") from None
    if saved.get("schema") != SCHEMA or saved.get("baseline") is None:
        raise OutputError(f"{path}: not a guard state this version reads (schema {saved.get('schema')!r})")
    s = guard.state
    s.points = [point(**p) for p in saved["points"]]
    s.every, s.stopped_early_at = list(saved["every"]), saved["stopped_early_at"]
    s.monitor_seconds, s.train_seconds = saved["monitor_seconds"], saved["train_seconds"]
    guard._since_check, guard._check_cost = saved["since_check"], saved["check_cost"]
    guard._best_gain = -math.inf if saved["best_gain"] is None else saved["best_gain"]
    guard._no_gain_checks = saved["no_gain_checks"]
    guard._frozen_sums = {n: (v[0], v[1]) for n, v in saved["frozen_sums"].items()}
    guard.baseline = EvalResult.model_validate(saved["baseline"])
    guard.baseline_heldout = EvalResult.model_validate(saved["baseline_heldout"])
    if saved["kept_weights"] and rank() == 0:  # only rank 0 keeps weights (adapt/guard.py)
        from safetensors.torch import load_file

        if not (folder / GUARD_KEPT).is_file():
            raise OutputError(f"{folder}: the guard's kept weights ({GUARD_KEPT}) are missing; remove the staging folder "
                              "and start again")
        guard.kept_weights = load_file(str(folder / GUARD_KEPT))
    guard._resumed = True


# -- after training: the --interpolate searches ---------------------------------------------------------------------
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
    from deltawise.adapt.checkpoints import run_key
    from deltawise.io.reader import ModelReader

    fingerprint = ModelReader(model_path, allow_pickle=cfg.allow_pickle, label=str(cfg.model)).fingerprint()
    key = run_key(cfg, dict(cfg.method_params or {}), fingerprint)
    return {**key, "guard": guard_key(guard)}


def _sha256(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def save_trained(work: Path, key: dict[str, Any], state: GuardState, result: TrainResult) -> None:
    """TRAINED: the guard's state and the training result at the end of training, the run's key, and a checksum of
    the output's training record (the checkpoint the searches start from must still be the one written)."""
    from deltawise.adapt.guard import TRAIN_RECORD

    write_json_atomic(work / TRAINED, {
        "schema": TRAINED_SCHEMA, "key": key, "output_record_sha256": _sha256(result.output / TRAIN_RECORD),
        "state": {**asdict(state), "points": [asdict(p) for p in state.points]},
        "train": {**asdict(result), "output": str(result.output)},
    })


def load_trained(work: Path, key: dict[str, Any], out: Path) -> tuple[GuardState, TrainResult]:
    """The state ``save_trained`` wrote, once the command, base, data and written checkpoint are checked to be the
    finished training's; OutputError naming what differs."""
    from deltawise.adapt.checkpoints import changed_parts
    from deltawise.adapt.guard import TRAIN_RECORD, GuardPoint, GuardState
    from deltawise.adapt.train import TrainResult

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
