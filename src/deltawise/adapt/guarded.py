"""A training run with a forgetting budget (``deltawise train --retain SOURCE:MIN``): data splits, the
retention guard (adapt/guard.py) and, with ``--interpolate``, the retention-budget search
(search/budget.py) between the base and the final model (WiSE-FT; Wortsman et al. 2022, arXiv
2109.01903) and between the kept checkpoint and the final model.

Data: every ``--retain`` and ``--target`` file is cut by item into a monitor split and a held-out split
with the budget search's rule (search/splits.py: seeded, ``--heldout-fraction`` held out). Without
``--target``, a seeded tenth of the training items (at least one) is taken out of training and cut the
same way: the target is then "the training distribution, on items not trained on".

Choice: the guard keeps the checked step with the largest target gain whose retention lower bound on
the monitor split clears every budget. With ``--interpolate`` the two searched segments each offer their
best point within the budget (chosen on the same monitor split); the one with the largest target
score among the kept checkpoint and those points is written, and reported on the held-out split. The
output folder's ``deltawise_guard.json`` records which point it is and why.

Work folder: ``.OUTPUT.guard`` beside the output (adapt/guard_searches.py's ``work_folder``), locked while a run uses
it and removed when it ends, except after an interruption in the ``--interpolate`` searches: it then keeps the
final weights, and a rerun with ``--resume`` runs the searches without retraining.

Several processes (``torchrun`` / ``accelerate launch``, DDP): every process prepares the same splits (seeded)
and runs the guard, which scores each check across the processes and takes rank 0's decisions (adapt/guard.py);
rank 0 writes the output, ``deltawise_guard.json`` and, with ``--interpolate``, runs the search alone after
training. The result equals one process with the global batch, to the tolerance of DDP's reduced gradients. A
sharded (FSDP) run is refused: its parameters are slices, which the guard can neither snapshot nor score alone.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from deltawise.adapt.dist import rank, world_size
from deltawise.adapt.guard import DEFAULT_SHARE, GuardState, MonitorData, RetentionGuard, evaluation_window
from deltawise.adapt.guard_searches import FINAL, TRAINED, load_trained, save_trained, searches_key, work_folder
from deltawise.adapt.sharding import fsdp_requested
from deltawise.adapt.train import TrainConfig, TrainResult, load_tokenizer, run_train
from deltawise.data.read import load_items
from deltawise.errors import InputError, OutputError
from deltawise.eval.runner import unique_names
from deltawise.io.output import STAGING_MARK, output_lock, unwritable
from deltawise.io.writer import write_json_atomic
from deltawise.options import BudgetSearchOptions, GuardOptions, IntervalOptions, SplitOptions
from deltawise.search.budget import RetentionBudget
from deltawise.search.splits import make_splits, split_items, write_items

SCHEMA = "deltawise.guard/1"
RECORD = "deltawise_guard.json"
TARGET_SHARE = 0.1  # share of the training items taken out as the default target
MAX_RETENTION = 2.0

Note = Callable[[str], None]


@dataclass
class GuardRequest:
    """What ``--retain`` asks of a training run."""

    retain: list[RetentionBudget]
    targets: list[Path] = field(default_factory=list)
    options: GuardOptions = field(default_factory=GuardOptions)
    split: SplitOptions = field(default_factory=SplitOptions)
    intervals: IntervalOptions = field(default_factory=IntervalOptions)
    eval_max_length: Optional[int] = None  # default: the training --max-length
    eval_batch_size: int = 8


@dataclass
class GuardedResult:
    train: TrainResult
    state: GuardState
    record: dict[str, Any]  # what deltawise_guard.json holds

    @property
    def chosen(self) -> dict[str, Any]:
        return self.record["chosen"]


def request_from(budget: BudgetSearchOptions, options: GuardOptions, split: SplitOptions) -> Optional[GuardRequest]:
    """The command line's guard options as a request; None when ``--retain`` is not given (a plain run)."""
    if not budget.retain:
        given = [flag for flag, on in (("--target", budget.target), ("--interpolate", options.interpolate),
                                       ("--interpolate-refine", options.interpolate_refine),
                                       ("--stop-early", options.stop_early), ("--monitor-every", options.monitor_every)) if on]
        if given:
            raise InputError(f"{', '.join(given)} guard a training run and need --retain SOURCE:MIN")
        return None
    if options.interpolate_refine and not options.interpolate:
        raise InputError("--interpolate-refine refines --interpolate's searches; add --interpolate")
    return GuardRequest(retain=[RetentionBudget.parse(r) for r in budget.retain], targets=list(budget.target), options=options,
                        split=split, eval_max_length=budget.eval_max_length, eval_batch_size=budget.eval_batch_size)


def check_request(cfg: TrainConfig, request: GuardRequest) -> None:
    """Clear errors before anything is trained."""
    if not request.retain:
        raise InputError("give at least one --retain SOURCE:MIN_RETENTION")
    for budget in request.retain:
        if not 0 < budget.minimum <= MAX_RETENTION:
            raise InputError(f"--retain {budget.data}:{budget.minimum:g}: the minimum retention must be in "
                             f"(0, {MAX_RETENTION:g}] (1 = as good as the base on SOURCE; 0.98 = lose at most 2%)")
    for label, path in [("--retain source", b.data) for b in request.retain] + [("--target", t) for t in request.targets]:
        if not Path(path).exists():
            raise InputError(f"{label} {path} does not exist")
        if Path(path).resolve() == Path(cfg.data).resolve():
            raise InputError(f"{label} {path} is the training data: its scores would not be out of sample")
    if fsdp_requested():
        raise InputError("--retain does not run sharded (FSDP): the guard keeps and scores whole copies of the weights; "
                         "launch the guarded run with DDP (torchrun, or accelerate without FSDP) or in one process")


def _default_target(cfg: TrainConfig, request: GuardRequest, work: Path) -> tuple[Path, Path]:
    """(training file, target file): a seeded share of the training items moved into a target file."""
    items = load_items(cfg.data, require=())
    position = len(request.retain)  # the cut's stream: the target's position among the search files
    train, held = split_items(items, TARGET_SHARE, request.split.split_seed, position) if len(items) > 1 else (items, [])
    if not held:
        raise InputError(f"{cfg.data} has {len(items)} item(s): too few to hold some out as the target; give --target")
    stem = Path(cfg.data).stem or Path(cfg.data).name
    as_text = [dataclasses.replace(i, fields={**i.fields, "text": str(i.fields.get("prompt", "")) + str(i.fields["response"])})
               if "text" not in i.fields and "response" in i.fields else i for i in held]
    return write_items(work / "train" / f"{stem}.jsonl", train), write_items(work / "target" / f"{stem}.jsonl", as_text)


def prepare_data(cfg: TrainConfig, request: GuardRequest, work: Path) -> tuple[TrainConfig, MonitorData]:
    """The monitor/held-out splits under ``work``, and the training config (its data without the default target's items)."""
    train_cfg, targets = cfg, list(request.targets)
    if not targets:
        train_file, target_file = _default_target(cfg, request, work)
        train_cfg, targets = dataclasses.replace(cfg, data=train_file), [target_file]
    files = [b.data for b in request.retain] + targets
    splits = make_splits(files, None, request.split.heldout_fraction, request.split.split_seed, work / "splits")
    names = unique_names(files)
    return train_cfg, MonitorData(splits, names, dict(zip(names, (b.minimum for b in request.retain))))


def guarded_train(cfg: TrainConfig, request: GuardRequest, model_path: Optional[Path] = None,
                  note: Optional[Note] = None, callbacks: Optional[list] = None) -> GuardedResult:
    """Train ``cfg`` under ``request``'s budgets and write the chosen model to ``cfg.output`` (module docstring);
    ``callbacks``: more transformers callbacks, run after the guard's. With ``--interpolate``, a run interrupted in
    the searches after training is finished by a rerun with ``cfg.resume`` without retraining (adapt/guard_searches.py)."""
    check_request(cfg, request)
    main = rank() == 0
    tell = note if note is not None and main else (lambda _m: None)  # several processes: rank 0 reports
    model_path = Path(model_path or cfg.model)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        # rank 0's folder is the output's own, locked (what it leaves is found again); the others' are private
        work = open_work_folder(cfg, held) if main else Path(tempfile.mkdtemp(prefix=f".{cfg.output.name}.guard-rank-",
                                                                        dir=cfg.output.parent))
        pending = main and (work / TRAINED).is_file()  # a finished training whose searches --resume runs (_open_work)
        keep = pending  # never thrown away by a failed resume (another command, say): the error tells what to do
        try:
            train_cfg, data = prepare_data(cfg, request, work)
            window = evaluation_window(cfg, request)
            opts = request.options
            guard = RetentionGuard(data, load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code), model_path,
                                   every=opts.monitor_every, share=DEFAULT_SHARE, stop_early=opts.stop_early,
                                   patience=opts.patience, final_to=work / FINAL if opts.interpolate else None,
                                   max_length=window, batch_size=request.eval_batch_size, intervals=request.intervals,
                                   note=tell)
            key = searches_key(cfg, guard, model_path) if main and (opts.interpolate or pending) else None
            if pending:
                if world_size() > 1:  # the other processes would wait in training for rank 0
                    raise InputError("the searches after training run in one process: rerun the command with --resume "
                                     "without torchrun / accelerate launch")
                state, result = load_trained(work, key, cfg.output)
                tell(f"guard: training finished in an earlier run ({result.steps} steps); searching again")
            else:
                result = run_train(train_cfg, model_path=model_path, callbacks=[guard, *(callbacks or [])])
                state = guard.state
            record = guard_record(cfg, request, state, data, train_cfg is not cfg)
            if not result.is_main_process:  # rank 0 writes the record and runs any interpolation
                return GuardedResult(result, state, record)
            if opts.interpolate and (work / FINAL).is_dir():
                if not keep:  # until the searches end, the output is the kept checkpoint and a rerun can finish them
                    write_json_atomic(cfg.output / RECORD, {**record, "interpolation": SEARCHES_PENDING})
                    save_trained(work, key, state, result)
                    keep = True
                from deltawise.adapt.interpolate import interpolate_training

                record = interpolate_training(cfg, request, model_path, state, data, record, work, tell)
            else:
                write_json_atomic(cfg.output / RECORD, record)
            keep = False
            return GuardedResult(result, state, record)
        finally:
            if keep:
                tell(f"guard: kept the finished training in {work}: rerun the command with --resume to run the "
                     "searches without retraining")
            else:
                shutil.rmtree(work, ignore_errors=True)


SEARCHES_PENDING = "not finished: the run was interrupted after training; rerun it with --resume to search without retraining"


def searches_pending(record: dict[str, Any]) -> bool:
    """Whether ``deltawise_guard.json`` is that of a run interrupted before its ``--interpolate`` searches ended (its
    output is the kept checkpoint for now)."""
    return record.get("interpolation") == SEARCHES_PENDING


def open_work_folder(cfg: TrainConfig, held: ExitStack) -> Path:
    """The guarded run's work folder (rank 0's: guard_searches.work_folder), locked while ``held`` is: emptied, unless it
    holds a finished training whose searches a ``--resume`` is to run; a finished training is not thrown away without
    ``--overwrite``."""
    work = work_folder(cfg.output)
    held.enter_context(output_lock(work, "guard work folder"))
    if work.exists():
        if not (work / STAGING_MARK).is_file():
            raise OutputError(f"{work} exists and was not made by deltawise; remove it and retry")
        if (work / TRAINED).is_file() and not cfg.overwrite and not cfg.resume:
            raise OutputError(f"{cfg.output} was trained by an earlier run that was interrupted in its --interpolate "
                              f"searches ({work} holds the final weights): rerun with --resume to search without "
                              "retraining, or with --overwrite to train again")
        if cfg.resume and (work / TRAINED).is_file():
            return work
        shutil.rmtree(work)
    try:
        work.mkdir()
        (work / STAGING_MARK).write_text("deltawise guarded run in progress\n")
    except OSError as exc:
        raise unwritable(work, exc) from None
    return work


def guard_record(cfg: TrainConfig, request: GuardRequest, state: GuardState, data: MonitorData,
                 target_from_training: bool) -> dict[str, Any]:
    """What ``deltawise_guard.json`` holds before any interpolation."""
    kept = next(p for p in state.points if p.kept) if state.points else None
    total = state.train_seconds + state.monitor_seconds
    why = ("no checked step met the budget: the most retentive one is kept" if not state.budget_met else
           "the largest target gain among the checked steps whose retention lower bound clears every budget")
    return {
        "schema": SCHEMA, "base_model": str(cfg.model), "training_data": str(cfg.data),
        "budgets": data.budgets, "targets": [str(t) for t in request.targets] or None,
        "target_from_training": {"share": TARGET_SHARE, "seed": request.split.split_seed} if target_from_training else None,
        "splits": [{"name": n, **s.to_json(), "monitor_items": len(s.selection_ids)} for n, s in zip(data.names, data.splits)],
        "intervals": request.intervals.describe(),
        "definition": "retention = ratio vs the base (ppl_base/ppl, acc/acc_base) on SOURCE; gain = mean target ratio - 1; "
                      "a step is feasible when every retention's one-sided lower bound on the monitor split clears its "
                      "budget; 'heldout' reports the chosen point on the held-out split",
        "monitor": {"every": request.options.monitor_every or "auto", "intervals_used": state.every,
                    "checks": len(state.points), "monitor_seconds": state.monitor_seconds, "train_seconds": state.train_seconds,
                    "overhead": state.monitor_seconds / total if total else None},
        "stopped_early_at": state.stopped_early_at, "budget_met": state.budget_met,
        "kept": None if kept is None else {"step": kept.step, "monitor": _point_numbers(kept), "heldout": state.heldout},
        "chosen": {"point": "kept checkpoint", "step": None if kept is None else kept.step, "why": why,
                   "within_budget": state.budget_met, "heldout": state.heldout,
                   "monitor": None if kept is None else _point_numbers(kept)},
    }


def _point_numbers(point) -> dict[str, Any]:
    return {"retention": point.retention, "retention_ci": point.retention_ci, "retention_lower": point.retention_lower,
            "gain": point.gain, "gain_ci": point.gain_ci, "feasible": point.feasible}


def chosen_lines(record: dict[str, Any]) -> list[str]:
    """What the command prints about the written model: which point, why, and its held-out numbers."""
    chosen = record["chosen"]
    lines = [f"guard: wrote the {chosen['point']}" + (f" (step {chosen['step']})" if chosen.get("step") is not None else "")
             + f": {chosen['why']}"]
    held = chosen.get("heldout")
    if held:
        for name, value in held["retention"].items():
            ci = held["retention_ci"].get(name)
            shown = f"{value:.4f}" if ci is None else f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
            lines.append(f"held out: retention {name} {shown} (budget {record['budgets'][name]:g})")
        if held.get("gain") is not None:
            ci = held.get("gain_ci")
            lines.append(f"held out: target gain {held['gain']:+.4f}" + ("" if ci is None else f" [{ci[0]:+.4f}, {ci[1]:+.4f}]"))
        verdict = "meets" if held["within_budget"] else "does NOT meet"
        lines.append(f"held out: the written model {verdict} the budget on items it was not chosen on")
    return lines
