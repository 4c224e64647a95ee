"""``bam --retain SOURCE:MIN``: Branch-and-Merge with a forgetting budget.

A BaM run's checkpoints are its rounds' merged models θ⁽¹⁾ … θ⁽ᴿ⁾ (adapt/bam.py keeps them in the work
folder), so the guard checks each round's model instead of every N optimizer steps: retention and target
gain on the monitor split against the base, with the same splits, intervals, feasibility rule and choice
as ``train --retain`` (adapt/guard.py, adapt/guarded.py). The written model is the best feasible round
(the most retentive one when none is), reported on the held-out split; ``--interpolate`` then searches
base → last round (WiSE-FT) and kept round → last round (adapt/interpolate.py). ``training_log.json``
holds one check per round (``step`` is the round); ``--stop-early`` and ``--monitor-every`` do not apply.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

from deltawise.adapt.bam import LOG, BamConfig, BamResult, run_bam
from deltawise.adapt.dist import world_size
from deltawise.adapt.guard import (GuardPoint, GuardState, MonitorData, best_feasible, compare, evaluation_options,
                                  most_retentive)
from deltawise.adapt.guarded import RECORD, GuardRequest, Note, check_request, guard_record, open_work_folder, prepare_data
from deltawise.errors import InputError
from deltawise.eval.results import EvalResult
from deltawise.eval.runner import EvalOptions, evaluate
from deltawise.io.output import staged_output


def _scorer(data: MonitorData, options: EvalOptions):
    def score(model: Path, heldout: bool) -> EvalResult:
        pick = [s.heldout if heldout else s.selection for s in data.splits]
        n = len(data.budgets)
        return evaluate(str(model), pick[:n], pick[n:], options)

    return score


def guarded_bam(cfg: BamConfig, request: GuardRequest, *, model_path: Optional[Path] = None, progress=None,
                note: Optional[Note] = None) -> tuple[BamResult, dict[str, Any]]:
    """Run BaM, check every round's model, write the chosen one to the output; (the BaM result, the guard record)."""
    if cfg.branch_index is not None or cfg.merge_only:
        raise InputError("--retain checks a whole BaM run: it does not combine with --branch-index or --merge-only")
    if request.options.stop_early or request.options.monitor_every:
        raise InputError("bam --retain checks every round's merged model: --stop-early and --monitor-every apply to train")
    check_request(cfg.train, request)
    if world_size() > 1:
        raise InputError("bam --retain runs in one process: it scores and keeps every round's merged model on one copy")
    tell = note or (lambda _m: None)
    model_path = Path(model_path or cfg.train.model)
    out = Path(cfg.train.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        work = open_work_folder(cfg.train, held)
        try:
            return _guarded_bam(cfg, request, model_path, work, out, progress, note, tell)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _guarded_bam(cfg: BamConfig, request: GuardRequest, model_path: Path, work: Path, out: Path, progress,
                 note: Optional[Note], tell: Note) -> tuple[BamResult, dict[str, Any]]:
    """guarded_bam's run in ``work`` (the splits; BaM's rounds stay in its own work folder)."""
    train_cfg, data = prepare_data(cfg.train, request, work)
    result = run_bam(dataclasses.replace(cfg, train=train_cfg), model_path=model_path, progress=progress, note=note)
    evaluation = evaluation_options(cfg.train, request)
    score = _scorer(data, evaluation)
    rounds = [cfg.work_dir / f"round_{j}" / "merged" for j in range(1, cfg.rounds + 1)]
    state = GuardState()
    baseline = score(model_path, False)
    for j, merged in enumerate(rounds, 1):
        start = time.perf_counter()
        numbers = compare(score(merged, False), baseline, request.intervals)
        feasible = all(numbers["retention_lower"][n] >= m for n, m in data.budgets.items())
        state.points.append(GuardPoint(step=j, **numbers, feasible=feasible, seconds=time.perf_counter() - start))
        state.monitor_seconds += state.points[-1].seconds
        shown = ", ".join(f"{n} {v:.4f}" for n, v in numbers["retention_lower"].items())
        tell(f"guard round {j}: retention lower bound {shown}; gain {numbers['gain']:+.4f}"
             f"{'' if feasible else ' (over budget)'}")
    kept = best_feasible(state.points)
    state.budget_met = kept is not None
    kept = kept or most_retentive(state.points)
    kept.kept, state.kept_step = True, kept.step
    state.train_seconds = result.log["seconds"]
    state.heldout = compare(score(rounds[kept.step - 1], True), score(model_path, True), request.intervals)
    state.heldout["within_budget"] = all(state.heldout["retention"][n] >= m for n, m in data.budgets.items())
    record = guard_record(cfg.train, request, state, data, train_cfg is not cfg.train)
    record["monitor"]["every"] = "round"
    if not state.budget_met:
        record["chosen"]["why"] = "no round met the budget: the most retentive one is kept"
    else:
        record["chosen"]["why"] = "the largest target gain among the rounds whose retention lower bound clears every budget"
    record["chosen"]["point"] = f"round {kept.step} of {len(rounds)}"
    with staged_output(out, overwrite=True) as staging:
        for f in sorted(rounds[kept.step - 1].iterdir()):
            if f.is_file():
                shutil.copy2(f, staging / f.name)
        shutil.copy2(out / LOG, staging / LOG)
        (staging / "training_log.json").write_text(json.dumps([p.to_json() for p in state.points], indent=2))
        (staging / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    if request.options.interpolate:
        from deltawise.adapt.interpolate import interpolate

        last = len(rounds)
        record = interpolate(out, request, model_path, data, record, work, evaluation, tell, final=rounds[-1],
                             kept=None if kept.step == last else rounds[kept.step - 1], budget_met=state.budget_met,
                             steps=(kept.step, last), carry=["training_log.json", LOG], embed={})
    return result, record
