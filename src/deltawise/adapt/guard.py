"""The retention guard: training with a forgetting budget, as a transformers ``TrainerCallback``.

    retention_s(step) = ppl_base / ppl_step on the monitor split of source s (acc_step / acc_base for accuracy)
    gain(step)        = mean over targets of the same ratio, minus 1
    feasible(step)    = lower_s(step) >= MIN_s for every source s
    kept              = argmax gain(step) over the feasible checked steps (ties: the larger retention)

``lower_s`` is the one-sided lower confidence bound of the retention (paired bootstrap over items,
eval/intervals.py), as in the retention-budget search (search/budget.py): a step is not kept because
its retention was over-estimated on a few items. The baseline is the model at step 0, which is the
base model for every method (adapters start at zero). Items are scored with ``deltawise eval``'s
scoring (search/scoring.py: ``score_data``), on the monitor split while training and on the
held-out split once, for the kept checkpoint: those are the numbers to report.

How often: every ``every`` optimizer steps, or, by default, as often as keeps the checks at
``share`` (10%) of the training time: after each step the interval is re-estimated as
ceil(check seconds / (share x step seconds)) from the measured times. The last step is always checked.

The kept checkpoint is held in memory (a CPU copy of every parameter training changes: the
trainable ones, and frozen ones a method writes back, found by a checksum) and put back into the
model when training ends, so the method saves it exactly as it saves a final model.

Several processes (torchrun / accelerate DDP): every process must take the same decision at the same
step (check now, keep, stop), or the collectives of training and scoring wait for each other forever.
The rule: the baseline and every check are scored by all processes, each on a contiguous share of the
items, and the per-item scores are all-gathered (adapt/guard_shards.py: sums of per-item NLLs and token
counts, so the intervals are exact); rank 0 alone compares them with the baseline and broadcasts the
point, from which every process derives the same kept step and stop; with the automatic interval, rank
0's measured times decide when to check and the decision is broadcast each step. Only rank 0 holds the
kept weights (the process that saves, as the trainer does), so the held-out report at the end is scored
by rank 0 alone while the others wait for its numbers. Sharded models (FSDP) are refused
(adapt/guarded.py).

``--resume``: the guard's state (the checks so far, the kept weights, the patience counter, the
baseline scores) is written into every training checkpoint and read back (adapt/guard_resume.py), so a
resumed run keeps the same checkpoint and trajectory as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from transformers import TrainerCallback

from deltawise.adapt.dist import broadcast_from_rank0, broadcast_object, is_distributed, rank, world_size
from deltawise.adapt.guard_shards import gather_results, shard
from deltawise.data.tasks import TaskData, load_data
from deltawise.errors import DeltawiseError
from deltawise.eval.forgetting import forgetting
from deltawise.eval.models import LoadedModel
from deltawise.eval.results import EvalResult
from deltawise.options import IntervalOptions
from deltawise.search.scoring import as_result, score_data
from deltawise.search.splits import Split

if TYPE_CHECKING:
    from deltawise.eval.runner import EvalOptions

TRAIN_RECORD = "deltawise_train.json"
DEFAULT_SHARE = 0.1  # monitoring's share of the training time when --monitor-every is 0


@dataclass
class GuardPoint:
    """One check: the model at ``step`` against the baseline on the monitor split."""

    step: int
    retention: dict[str, float]  # source name -> ratio (> 1: better than the base)
    retention_ci: dict[str, Optional[list[float]]]
    retention_lower: dict[str, float]  # one-sided lower bound, what must clear the budget
    gain: Optional[float]  # mean target ratio - 1
    gain_ci: Optional[list[float]]
    feasible: bool
    seconds: float  # the check's wall time
    kept: bool = False

    @property
    def retention_min(self) -> float:
        return min(self.retention_lower.values())

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "guard": {k: v for k, v in asdict(self).items() if k != "step"}}


@dataclass
class MonitorData:
    """The monitor/held-out splits a guard scores: sources first, then targets, in the budgets' order."""

    splits: list[Split]
    names: list[str]  # dataset names (unique), one per split
    budgets: dict[str, float]  # source name -> minimum retention
    task: str = "auto"

    def sets(self, heldout: bool) -> list[TaskData]:
        return [load_data(s.heldout if heldout else s.selection, self.task) for s in self.splits]

    @property
    def sources(self) -> list[str]:
        return list(self.budgets)


@dataclass
class GuardState:
    """What the guard found, read by the caller after training (adapt/guarded.py)."""

    points: list[GuardPoint] = field(default_factory=list)
    kept_step: Optional[int] = None
    budget_met: bool = False
    heldout: Optional[dict[str, Any]] = None  # the kept checkpoint on the held-out split
    stopped_early_at: Optional[int] = None
    monitor_seconds: float = 0.0  # the periodic checks only (not the baseline or the held-out report)
    train_seconds: float = 0.0  # the optimizer steps, checks excluded
    every: list[int] = field(default_factory=list)  # the interval in force at each check


def compare(result: EvalResult, baseline: EvalResult, intervals: IntervalOptions) -> dict[str, Any]:
    """Retention per source and mean target gain, with intervals, of ``result`` against ``baseline``."""
    f = forgetting(result, baseline, intervals)
    sources = [c for c in f.datasets if c.role == "source"]
    return {
        "retention": {c.name: c.ratio for c in sources},
        "retention_ci": {c.name: None if c.ratio_ci is None else list(c.ratio_ci) for c in sources},
        "retention_lower": {c.name: c.ratio if c.ratio_lower is None else c.ratio_lower for c in sources},
        "gain": f.target_gain, "gain_ci": None if f.target_gain_ci is None else list(f.target_gain_ci),
    }


def best_feasible(points: list[GuardPoint]) -> Optional[GuardPoint]:
    """The feasible point with the largest target gain (ties: the larger retention bound, then the earlier step)."""
    feasible = [p for p in points if p.feasible]
    if not feasible:
        return None
    return max(feasible, key=lambda p: (-math.inf if p.gain is None else p.gain, p.retention_min, -p.step))


def most_retentive(points: list[GuardPoint]) -> Optional[GuardPoint]:
    """The infeasible point with the largest retention lower bound: what is kept when no point is feasible."""
    infeasible = [p for p in points if not p.feasible]
    return max(infeasible, key=lambda p: (p.retention_min, -p.step)) if infeasible else None


def _checksum(t: torch.Tensor) -> tuple[float, float]:
    x = t.detach().double()
    return float(x.sum()), float((x * x).sum())


class RetentionGuard(TrainerCallback):
    """Checks retention and target gain every N steps, keeps the best checkpoint within the budget,
    optionally stops early, and puts the kept weights back when training ends."""

    def __init__(self, data: MonitorData, tokenizer: Any, model_path: Path, *, every: int = 0, share: float = DEFAULT_SHARE,
                 stop_early: bool = False, patience: int = 2, final_to: Optional[Path] = None, max_length: int = 256,
                 batch_size: int = 8, intervals: Optional[IntervalOptions] = None, note: Optional[Callable[[str], None]] = None):
        self.data, self.tokenizer, self.model_path = data, tokenizer, model_path
        self.every, self.share, self.stop_early, self.patience = every, share, stop_early, patience
        self.final_to, self.max_length, self.batch_size = final_to, max_length, batch_size
        self.intervals = intervals or IntervalOptions()
        self.tell = note or (lambda _m: None)
        self.state = GuardState()
        self.monitor_sets: list[TaskData] = []
        self.baseline: Optional[EvalResult] = None
        self.baseline_heldout: Optional[EvalResult] = None
        self.kept_weights: Optional[dict[str, torch.Tensor]] = None
        self.final_weights: Optional[dict[str, torch.Tensor]] = None
        self._frozen_sums: dict[str, tuple[float, float]] = {}
        self._since_check = 0
        self._last_end = 0.0
        self._check_cost = 0.0  # seconds of one check (the baseline's, then a running mean)
        self._best_gain = -math.inf
        self._no_gain_checks = 0
        self.main = True  # rank 0 of a multi-process run (set when training begins): it decides and keeps weights
        self._resumed = False  # the state came from a checkpoint (load_checkpoint)

    # -- scoring -------------------------------------------------------------------------------
    def _score(self, model: torch.nn.Module, sets: list[TaskData], label: str, *, alone: bool = False) -> EvalResult:
        """``sets`` scored with ``eval``'s scoring; in a multi-process run each process scores its share of the
        items and every process gets the whole result (module docstring), unless ``alone``."""
        shared = is_distributed() and not alone
        me, world = (rank(), world_size()) if shared else (0, 1)
        lm = LoadedModel(self.model_path, model, self.tokenizer, label)
        was_training = model.training
        model.eval()
        try:
            mine = []
            for name, data in zip(self.data.names, sets):
                part = shard(data, me, world) if shared else data
                result = score_data(lm, part, name=name, max_length=self.max_length, batch_size=self.batch_size) \
                    if part.items else None
                if result is not None:
                    result.role = "source" if name in self.data.budgets else "target"
                mine.append(result)
        finally:
            model.train(was_training)
        return as_result(label, gather_results(mine) if shared else mine)

    def compare(self, result: EvalResult, baseline: EvalResult) -> dict[str, Any]:
        return compare(result, baseline, self.intervals)

    # -- weights -------------------------------------------------------------------------------
    def _changing(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Parameters training changes: the trainable ones, and frozen ones that no longer match their checksum."""
        params = dict(model.named_parameters())
        return {n: p for n, p in params.items() if p.requires_grad or _checksum(p) != self._frozen_sums.get(n)}

    def _snapshot(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self._changing(model).items()}

    @torch.no_grad()
    def _load(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        for n, value in weights.items():
            params[n].copy_(value.to(params[n].device))

    # -- trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.main = state.is_world_process_zero
        self.monitor_sets = self.data.sets(heldout=False)
        if self._resumed:  # the baseline, the checks so far and the kept weights came from the checkpoint
            self.tell(f"guard: resumed at step {state.global_step} with {len(self.state.points)} check(s) so far")
            self._last_end = time.perf_counter()
            return
        self._frozen_sums = {n: _checksum(p) for n, p in model.named_parameters() if not p.requires_grad}
        start = time.perf_counter()
        self.baseline = self._score(model, self.monitor_sets, "step 0")
        self._check_cost = time.perf_counter() - start
        self.baseline_heldout = self._score(model, self.data.sets(heldout=True), "step 0 (held out)")
        self.tell(f"guard: baseline scored on the monitor split in {self._check_cost:.1f} s")
        self._last_end = time.perf_counter()

    def interval(self, step_seconds: float) -> int:
        """Steps between checks: the fixed ``every``, or the one that keeps checks at ``share`` of the time."""
        if self.every > 0:
            return self.every
        return max(1, math.ceil(self._check_cost / (self.share * max(step_seconds, 1e-9))))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        now = time.perf_counter()
        self.state.train_seconds += now - self._last_end
        self._since_check += 1
        steps_done = max(state.global_step, 1)
        every = self.interval(self.state.train_seconds / steps_done)
        due = self._since_check >= every or state.global_step >= state.max_steps
        if self.every <= 0 and is_distributed():  # measured times differ between processes: rank 0's decide
            due, every = (int(v) for v in broadcast_from_rank0(torch.tensor([int(due), every], dtype=torch.int64)))
        if due:
            self.state.every.append(every)
            self.check(model, state.global_step, control)
        self._last_end = time.perf_counter()

    def check(self, model: torch.nn.Module, step: int, control) -> GuardPoint:
        """Score the model, record the point and decide (keep, stop); in a multi-process run rank 0 compares and
        broadcasts the point, and every process derives the same decisions from the same points."""
        start = time.perf_counter()
        result = self._score(model, self.monitor_sets, f"step {step}")
        point = None
        if self.main:
            numbers = self.compare(result, self.baseline)
            feasible = all(numbers["retention_lower"][n] >= m for n, m in self.data.budgets.items())
            point = GuardPoint(step=step, **numbers, feasible=feasible, seconds=time.perf_counter() - start)
        point = broadcast_object(point)
        feasible, seconds = point.feasible, point.seconds
        self.state.points.append(point)
        self.state.monitor_seconds += seconds
        checks = len(self.state.points)
        self._check_cost += (seconds - self._check_cost) / (checks + 1)  # running mean, the baseline's time included
        self._since_check = 0
        gain = -math.inf if point.gain is None else point.gain
        if gain > self._best_gain:
            self._best_gain, self._no_gain_checks = gain, 0
        else:
            self._no_gain_checks += 1
        kept = self._kept_point() or self._fallback()  # with no feasible step yet, the most retentive one is held
        if kept is point and self.main:
            self.kept_weights = self._snapshot(model)
        shown = ", ".join(f"{n} {point.retention[n]:.4f} (lower {point.retention_lower[n]:.4f})" for n in point.retention)
        self.tell(f"guard step {step}: retention {shown}; gain {gain:+.4f}{'' if feasible else ' (over budget)'}"
                  f"{'; kept' if kept is point and feasible else ''}")
        if self.stop_early and not feasible and self._no_gain_checks >= self.patience:
            self.state.stopped_early_at = step
            control.should_training_stop = True
            self.tell(f"guard: stopping early at step {step}: retention is below the budget and the target gain has "
                      f"not improved for {self._no_gain_checks} check(s)")
        return point

    def _kept_point(self) -> Optional[GuardPoint]:
        return best_feasible(self.state.points)

    def _fallback(self) -> Optional[GuardPoint]:
        return most_retentive(self.state.points)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.state.points:
            return
        if self.final_to is not None and self.main:
            self.final_weights = self._snapshot(model)
        kept = self._kept_point()
        self.state.budget_met = kept is not None
        if kept is None:
            kept = self._fallback()
            self.tell(f"guard: no checked step meets the budget; keeping the most retentive one, step {kept.step}")
        kept.kept = True
        self.state.kept_step = kept.step
        # rank 0 alone holds the kept weights: it puts them back and scores the held-out split, the others wait
        heldout, error = None, None
        if self.main:
            try:
                heldout = self._restore_and_report(model, kept)
            except DeltawiseError as exc:
                error = str(exc)
        heldout, error = broadcast_object((heldout, error))
        if error is not None:
            raise DeltawiseError(error)
        self.state.heldout = heldout

    def _restore_and_report(self, model: torch.nn.Module, kept: GuardPoint) -> dict[str, Any]:
        if kept is not self.state.points[-1]:
            # a frozen tensor a method first wrote after the kept snapshot cannot be put back (its start value is not held)
            late = sorted(set(self._changing(model)) - set(self.kept_weights))
            if late:
                raise DeltawiseError(f"the guard cannot restore step {kept.step}: {', '.join(late[:3])} changed only after it "
                                     "(a method that writes frozen weights late); train without --retain or check every step")
            self._load(model, self.kept_weights)
        heldout = self.compare(self._score(model, self.data.sets(heldout=True), f"step {kept.step}", alone=True),
                               self.baseline_heldout)
        heldout["within_budget"] = all(heldout["retention"][n] >= m for n, m in self.data.budgets.items())
        return heldout

    # -- --resume (adapt/guard_resume.py) ------------------------------------------------------
    def resume_key(self) -> dict[str, Any]:
        """The guard's part of the run key: a resume with other budgets, splits or checks is refused."""
        from deltawise.adapt.guard_resume import guard_key

        return {"guard": guard_key(self)}

    def save_checkpoint(self, folder: Path) -> None:
        """Called by the trainer (rank 0) while it writes a checkpoint, before the files that mark it complete."""
        from deltawise.adapt.guard_resume import save_guard

        save_guard(self, folder)

    def load_checkpoint(self, folder: Path) -> None:
        """Called by every process before a resumed run trains: the state as the checkpoint's step left it."""
        from deltawise.adapt.guard_resume import load_guard

        load_guard(self, folder, GuardPoint)

    def finish_output(self, staging: Path, model: torch.nn.Module, save: Callable[[Path], None]) -> None:
        """The training run's hook before its output moves into place (adapt/train.py): append the checks to
        ``training_log.json`` and, when ``final_to`` was given, save the final step's weights there with the
        method's own ``save``, then put the kept ones back."""
        log_path = staging / "training_log.json"
        log = json.loads(log_path.read_text()) if log_path.exists() else []
        log_path.write_text(json.dumps(sorted(log + [p.to_json() for p in self.state.points], key=lambda r: r["step"]),
                                       indent=2))
        if self.final_to is None or self.final_weights is None:
            return
        self._load(model, self.final_weights)
        try:
            save(self.final_to)
            shutil.copy2(staging / TRAIN_RECORD, self.final_to / TRAIN_RECORD)
        finally:
            if self.state.kept_step != self.state.points[-1].step:
                self._load(model, self.kept_weights)


def evaluation_window(cfg, request) -> int:
    """The token window the guard scores with: ``--eval-max-length``, else the training window."""
    return request.eval_max_length or cfg.max_length or 256


def evaluation_options(cfg, request) -> EvalOptions:
    """How saved models are scored after training (BaM's rounds, ``--interpolate``'s searches): the guard's window
    and batch size, on the training run's device (a GPU run's searches would otherwise score on the CPU) and with its
    ``--trust-remote-code``. ``cfg``: the run's TrainConfig; ``request``: its guarded.GuardRequest."""
    from deltawise.adapt.runtime import resolve_device
    from deltawise.eval.runner import EvalOptions

    return EvalOptions(max_length=evaluation_window(cfg, request), batch_size=request.eval_batch_size,
                       device=resolve_device(cfg.device), trust_remote_code=cfg.trust_remote_code)
