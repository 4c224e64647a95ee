"""``deltawise lr-sweep``: short training runs over a learning-rate grid, each scored for target gain and
retention, and the largest gain whose retention clears the budget.

Each rate trains ``steps`` optimizer steps (``adapt/train.py``'s ``run_train``, nothing else changed)
on the first ``max_examples`` items of the training data, then the run is scored against the base on
the --retain and --target files, each cut into a selection split and a held-out split
(search/splits.py). The rule is the retention-budget search's (search/budget.py): a rate is feasible
when the one-sided lower confidence bound of each source's retention on the selection split clears
its budget; the recommendation is the feasible rate with the largest target score there; its numbers
on the held-out split, with paired bootstrap intervals, are the reported ones.

The sweep folder (OUT) caches every run: ``runs/lr-<rate>-<key>/`` is a finished training output
(written atomically by ``run_train``) with its scores in ``sweep_scores.json``; ``<key>`` hashes all
that decides the run (model, training data subset, method and parameters, rate, steps, settings), so
a rerun after an interruption trains only what is missing and a changed setting never reuses a stale
run. Runs are jobs of an executor (adapt/executors.py): one after another in this process, ``--jobs`` worker
processes at a time (each with its share of the CPU threads), or Ray tasks.

What short runs predict: the ordering of rates by how fast they forget and gain early, which is
where a too-large rate shows (retention collapses in the first hundred steps). What they do not: the
final gain and retention of a full-length run (both keep moving; forgetting can grow long after the
gain saturates), the effect of the schedule's decay, and anything about data the subset lacks.
Check the recommended rate with a full-length run (``deltawise train ... --lr``) and ``deltawise eval``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Optional

from deltawise.data.read import load_items
from deltawise.errors import InputError, OutputError
from deltawise.eval.forgetting import forgetting
from deltawise.eval.results import EvalResult
from deltawise.eval.runner import EvalOptions, evaluate, unique_names
from deltawise.io.output import check_output_folder, output_lock
from deltawise.io.writer import write_json_atomic
from deltawise.options import ExecutorOptions
from deltawise.search.budgeted import BudgetedOptions, Note
from deltawise.search.splits import Split, write_items

SCHEMA = "deltawise.lr_sweep/1"
MARKER = ".deltawise-lr-sweep"
SCORES = "sweep_scores.json"


@dataclass
class SweepOptions(BudgetedOptions):
    """The budgets, targets, splits and scoring of ``BudgetedOptions`` (progress counts "runs"), the grid, the runs'
    training settings, and where the runs train (``executor``: inline, local processes or Ray tasks)."""

    lrs: tuple[float, ...]
    steps: int
    method: str = "lora"
    method_params: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # other TrainingOptions fields (batch size, seed, schedule, ...)
    max_examples: Optional[int] = None  # the training subset: the first N items of --data
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    overwrite: bool = False  # discard the cached runs
    trust_remote_code: bool = False

    target_use: ClassVar[str] = "to measure the gain on"

    def check(self) -> None:
        super().check()
        if not self.lrs or any(not (math.isfinite(lr) and lr > 0) for lr in self.lrs):
            raise InputError(f"--lrs takes positive learning rates, e.g. 1e-5,1e-4,1e-3; got {list(self.lrs)}")
        if len(set(self.lrs)) != len(self.lrs):
            raise InputError(f"--lrs names a rate twice: {list(self.lrs)}")
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if self.executor.jobs < 1:
            raise InputError(f"--jobs must be at least 1, got {self.executor.jobs}")


@dataclass
class SweepPoint:
    lr: float
    folder: Path
    train_seconds: float
    selection: dict[str, Any]  # retention / retention_lower / target per dataset, on the selection split
    heldout: dict[str, Any]  # retention / target with intervals, on the held-out split
    feasible: bool = False

    @property
    def target_score(self) -> float:
        return sum(self.selection["target"].values()) / len(self.selection["target"])


@dataclass
class SweepResult:
    points: list[SweepPoint]
    budgets: dict[str, float]
    recommended: Optional[int]
    splits: list[dict[str, Any]]
    intervals: dict[str, Any]
    plot: Optional[Path] = None

    def to_json(self) -> dict[str, Any]:
        rec = None if self.recommended is None else self.points[self.recommended]
        budgets_met = None if rec is None else all(rec.heldout["retention"][n] >= m for n, m in self.budgets.items())
        return {
            "schema": SCHEMA, "budgets": self.budgets, "splits": self.splits, "intervals": self.intervals,
            "definition": "retention and target: ratio to the base (ppl_base/ppl); a rate is feasible when every "
                          "retention's one-sided lower bound on the selection split clears its budget; the recommendation "
                          "is the feasible rate with the largest mean target ratio there, reported on the held-out split",
            "runs": [{"lr": p.lr, "folder": str(p.folder), "train_seconds": p.train_seconds, "feasible": p.feasible,
                      "target_score": p.target_score, "selection": p.selection, "heldout": p.heldout} for p in self.points],
            "recommended_lr": None if rec is None else rec.lr,
            "recommended": None if rec is None else {"lr": rec.lr, "heldout": rec.heldout, "within_budget": budgets_met},
            "plot": None if self.plot is None else str(self.plot),
        }


@dataclass(frozen=True)
class _Run:
    """One rate's training run and its scoring, picklable for a worker process."""

    lr: float
    folder: Path
    config: dict[str, Any]  # TrainConfig keyword arguments
    model: str
    sources: tuple[tuple[Path, Path], ...]  # (selection, held-out) per --retain
    targets: tuple[tuple[Path, Path], ...]
    eval: EvalOptions
    threads: Optional[int]  # torch threads in a worker (None: leave this process as it is)


def _key(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run_key(common: dict[str, Any], lr: float, pairs: tuple[tuple[Path, Path], ...], options: SweepOptions) -> str:
    """What decides a run and its scores: every training setting (defaults filled in, so the command line and
    Python agree), the training subset's and the splits' contents, the evaluation settings."""
    from deltawise.adapt.train import TrainConfig

    settings = asdict(TrainConfig(**common, lr=lr, output=Path("run")))
    for name in ("output", "progress", "overwrite"):
        settings.pop(name)
    settings["data"] = _file_digest(common["data"])
    settings["eval"] = {k: v for k, v in asdict(options.eval).items() if k != "progress"}
    settings["splits"] = [(_file_digest(a), _file_digest(b)) for a, b in pairs]
    return _key(settings)


def _train_and_score(run: _Run) -> None:
    """Train (unless the cached run is complete) and score the run on both splits; runs in a worker process."""
    import torch

    from deltawise.adapt.train import TrainConfig, run_train

    if run.threads is not None:
        torch.set_num_threads(run.threads)
    if not (run.folder / "deltawise_train.json").is_file():
        run_train(TrainConfig(**run.config, output=run.folder, overwrite=True))
    if (run.folder / SCORES).is_file():
        return
    opts = EvalOptions(**{**asdict(run.eval), "progress": None, "base": run.model})
    scores = {split: evaluate(str(run.folder), [s[i] for s in run.sources], [t[i] for t in run.targets], opts).model_dump()
              for i, split in enumerate(("selection", "heldout"))}
    write_json_atomic(run.folder / SCORES, scores)


def _prepare(out: Path, model: str, data: Path, options: SweepOptions) -> None:
    """Refuse an output that is an input or a folder this command did not make; lay the folder out."""
    inputs = [("model", Path(model)), ("data", Path(data)), *[("retain source", b.data) for b in options.retain],
              *[("target", t) for t in options.targets]]
    check_output_folder(out, inputs, overwrite=True)  # a sweep folder is resumed, not replaced
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise OutputError(f"{out} is not empty and is not an lr-sweep folder; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("deltawise lr-sweep folder: cached runs, reused by the next sweep into it\n")


def run_lr_sweep(model: str, data: Path, out: str | Path, options: SweepOptions) -> SweepResult:
    """Train, score and recommend (see the module docstring); writes ``sweep.json`` and ``sweep.png`` into ``out``."""
    out, data = Path(out), Path(data)
    options.check()
    _prepare(out, model, data, options)
    tell = options.note or (lambda _m: None)
    with output_lock(out, "lr-sweep folder"):
        if options.overwrite:
            import shutil

            shutil.rmtree(out / "runs", ignore_errors=True)
        items = load_items(data, require=())
        subset = items[: options.max_examples] if options.max_examples else items
        train_file = out / "data" / f"{data.stem or 'data'}.jsonl"
        write_items(train_file, subset)
        splits = options.splits(out / "splits")
        pairs = tuple((s.selection, s.heldout) for s in splits)
        n = len(options.retain)
        common = dict(model=Path(model), data=train_file, method=options.method, method_params=dict(options.method_params),
                      max_steps=options.steps, progress=False, trust_remote_code=options.trust_remote_code, **options.training)
        runs = [_Run(lr, out / "runs" / f"lr-{lr:g}-{_run_key(common, lr, pairs, options)}", {**common, "lr": lr}, str(model),
                     pairs[:n], pairs[n:], options.eval, None) for lr in options.lrs]
        cached = [r for r in runs if (r.folder / SCORES).is_file()]
        if cached:
            tell(f"reusing {len(cached)} finished run(s): " + ", ".join(f"lr {r.lr:g}" for r in cached))
        _execute([r for r in runs if r not in cached], options, tell, len(cached), len(runs))
        return _summarise(out, model, runs, splits, options)


def _execute(pending: list[_Run], options: SweepOptions, tell: Note, done: int, total: int) -> None:
    """Train and score the runs not cached yet, on the chosen executor; a failed run leaves the others finished
    and cached, so a rerun of the sweep trains only what failed."""
    from deltawise.adapt.executors import executor_for

    tick = options.progress or (lambda _s, _d, _t: None)
    tick("runs", done, total)
    executor, threads = executor_for(options.executor, len(pending))
    pending = [replace(run, threads=threads) for run in pending]

    def finished(_index: int, _result: None) -> None:
        nonlocal done
        done += 1
        tick("runs", done, total)

    if executor.name == "inline":
        for run in pending:
            tell(f"training lr {run.lr:g} for {run.config['max_steps']} steps")
            _train_and_score(run)
            finished(0, None)
        return
    tell(f"training {len(pending)} rates with the {executor.name} executor")
    executor.run(_train_and_score, pending, on_done=finished)


def _baseline(out: Path, model: str, runs: list[_Run], options: SweepOptions) -> dict[str, EvalResult]:
    """The base's scores on both splits, cached beside the runs under the same kind of key."""
    run = runs[0]
    opts = EvalOptions(**{**asdict(options.eval), "progress": None})
    files = [(_file_digest(a), _file_digest(b)) for a, b in run.sources + run.targets]
    path = out / f"baseline-{_key({'model': model, 'splits': files, 'eval': {**asdict(opts), 'progress': None}})}.json"
    if not path.is_file():
        write_json_atomic(path, {split: evaluate(model, [s[i] for s in run.sources], [t[i] for t in run.targets], opts)
                                 .model_dump() for i, split in enumerate(("selection", "heldout"))})
    return {k: EvalResult.model_validate(v) for k, v in json.loads(path.read_text()).items()}


def _summarise(out: Path, model: str, runs: list[_Run], splits: list[Split], options: SweepOptions) -> SweepResult:
    base = _baseline(out, model, runs, options)
    names = unique_names([b.data for b in options.retain] + list(options.targets))
    budgets = dict(zip(names, (b.minimum for b in options.retain)))
    points = []
    for run in runs:
        scores = {k: EvalResult.model_validate(v) for k, v in json.loads((run.folder / SCORES).read_text()).items()}
        sel = {c.name: c for c in forgetting(scores["selection"], base["selection"], options.intervals).datasets}
        held = {c.name: c for c in forgetting(scores["heldout"], base["heldout"], options.intervals).datasets}
        meta = json.loads((run.folder / "deltawise_train.json").read_text())
        point = SweepPoint(
            run.lr, run.folder, float(meta.get("seconds", 0.0)),
            {"retention": {n: sel[n].ratio for n in budgets},
             "retention_lower": {n: sel[n].ratio if sel[n].ratio_lower is None else sel[n].ratio_lower for n in budgets},
             "target": {n: sel[n].ratio for n in names if n not in budgets}},
            {"retention": {n: held[n].ratio for n in budgets}, "retention_ci": {n: held[n].ratio_ci for n in budgets},
             "target": {n: held[n].ratio for n in names if n not in budgets},
             "target_ci": {n: held[n].ratio_ci for n in names if n not in budgets}})
        point.feasible = all(point.selection["retention_lower"][n] >= m for n, m in budgets.items())
        points.append(point)
    feasible = [i for i, p in enumerate(points) if p.feasible]
    recommended = max(feasible, key=lambda i: (points[i].target_score, -points[i].lr)) if feasible else None
    result = SweepResult(points, budgets, recommended, [s.to_json() for s in splits], options.intervals.describe())
    from deltawise.search.lr_sweep_plot import plot_sweep

    result.plot = plot_sweep(result, out / "sweep.png")
    write_json_atomic(out / "sweep.json", result.to_json())
    return result
