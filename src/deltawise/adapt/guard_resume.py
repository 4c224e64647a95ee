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

An interruption after training, in ``--interpolate``'s searches, is resumed by adapt/guard_searches.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltawise.errors import OutputError
from deltawise.eval.results import EvalResult
from deltawise.io.writer import write_json_atomic

if TYPE_CHECKING:
    from deltawise.adapt.guard import RetentionGuard

GUARD_STATE = "deltawise_guard_state.json"
GUARD_KEPT = "deltawise_guard_kept.safetensors"
SCHEMA = "deltawise.guard_state/1"


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

