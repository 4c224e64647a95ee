"""Retention-budget merging: the merge parameters that do best on the targets while keeping each
source's performance within its budget.

    retention_s(θ) = ratio of source s (eval/forgetting.py): ppl_base / ppl_θ for perplexity,
                     acc_θ / acc_base for accuracy (> 1: better than the base)
    target(θ)      = mean over target datasets of the same ratio (1 + the forgetting report's target gain)
    choose         argmax target(θ_p)  over the searched points p  subject to  lower_s(θ_p) ≥ budget_s  ∀ s

Selection and report use different items (search/splits.py): each --retain and --target file is cut
into a selection split and a held-out split (seeded; half each by default), or the user names a
held-out file per search file. Every point is scored on the selection split; a point is feasible
only when the one-sided lower confidence bound of each source's retention (lower_s, paired
bootstrap over items, eval/intervals.py; 95% by default) clears its budget, so a point does not
look feasible because its retention was over-estimated on a few items. The chosen point is written,
then evaluated on the held-out split; those numbers, with their intervals, are the reported ones.

Searched points: a grid (the method's strength parameter, ``lambda`` or ``t``, at 0.2 … 1.0 by
default; ``--search-param NAME=v1,v2,…`` replaces it and may name any of the method's parameters,
several giving their Cartesian product), then optionally ``refine`` rounds of successive
refinement for one parameter: the midpoints between the best feasible value and its evaluated
neighbours are tried. The Pareto front is taken over (smallest retention among the sources, target
score).

Each point is a job for an executor (adapt/executors.py: inline, local processes or Ray tasks, each
with its share of the CPU threads): the streaming engine merges it into the work folder
(``OUT.budget-work`` beside OUT), the eval code scores the merge on the selection split, the merge is
deleted and the scores are kept as ``candidates/<key>.json``; ``<key>`` hashes all that decides them
(the recipe with the point's values, the inputs' fingerprints, the selection files, the scoring
settings). Every executor reads the scores back from that file, so the choice is the same whichever
ran the jobs; a rerun after a failed or interrupted search scores only the points not yet kept.
The chosen point is merged again into OUT (atomic), and the work folder removed; when no point
meets the budget nothing is written, unless ``most_retentive`` asks for the point with the highest
retention.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from deltawise.errors import DeltawiseError, InputError, OutputError, RecipeError
from deltawise.eval.forgetting import forgetting
from deltawise.eval.results import EvalResult
from deltawise.eval.runner import EvalOptions, evaluate, unique_names
from deltawise.io.output import check_output_folder, output_lock
from deltawise.io.writer import write_json_atomic
from deltawise.merge.engine import MergeOptions, check_output, run_merge
from deltawise.merge.params import ParamError
from deltawise.merge.plan import build_plan
from deltawise.merge.recipe import Recipe
from deltawise.options import ExecutorOptions
from deltawise.search.budgeted import BudgetedOptions, RetentionBudget  # noqa: F401 - RetentionBudget: imported from here
from deltawise.search.splits import Split

SCHEMA = "deltawise.budget/2"
WORK_MARKER = ".deltawise-budget"
STRENGTH = ("lambda", "t")  # searched by default, the first the method has
DEFAULT_GRID = (0.2, 0.4, 0.6, 0.8, 1.0)


class BudgetNotMet(DeltawiseError):
    """No searched point keeps every source within its budget; ``result`` has every point."""

    def __init__(self, message: str, result: "BudgetResult"):
        super().__init__(message)
        self.result = result


@dataclass
class BudgetOptions(BudgetedOptions):
    """The budgets, targets, splits and scoring of ``BudgetedOptions`` (progress counts "candidates"), the grid,
    the merges, and where the candidates run (``executor``: inline, local processes or Ray tasks)."""

    grid: dict[str, list[Any]] = field(default_factory=dict)  # empty: the method's strength parameter
    refine: int = 0
    most_retentive: bool = False
    baseline: Optional[str] = None  # model retention is measured against (default: the recipe's base_model)
    merge: MergeOptions = field(default_factory=MergeOptions)
    allow_pickle: bool = False
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    work: Optional[Path] = None  # the candidates' cache (default: OUT.budget-work beside OUT)


@dataclass(frozen=True)
class CandidateJob:
    """One searched point as an executor ships it (picklable): merge ``recipe`` into ``folder``, score the merge on
    the selection split, keep the scores in ``result``; a finished candidate (``result`` exists) is not redone."""

    recipe: Recipe  # with the point's parameters set
    folder: Path
    result: Path
    sources: tuple[Path, ...]  # selection files of the --retain sources, then of the --targets
    targets: tuple[Path, ...]
    eval: EvalOptions
    merge: MergeOptions
    allow_pickle: bool
    threads: Optional[int] = None  # torch threads in a worker (None: leave this process as it is)


def score_candidate(job: CandidateJob) -> dict[str, Any]:
    """Merge and score one candidate unless its scores are cached; returns them as stored (JSON), so a cached,
    a local and a Ray candidate read the same numbers. Runs in any process."""
    if job.threads is not None:
        import torch

        torch.set_num_threads(job.threads)
    if not job.result.is_file():
        plan = build_plan(job.recipe, allow_pickle=job.allow_pickle)
        shutil.rmtree(job.folder, ignore_errors=True)  # an interrupted attempt's partial merge
        job.folder.mkdir(parents=True)
        try:
            run_merge(plan, job.folder / "model", job.merge)
            scores = evaluate(str(job.folder / "model"), list(job.sources), list(job.targets), job.eval)
        finally:
            shutil.rmtree(job.folder, ignore_errors=True)
        write_json_atomic(job.result, scores.model_dump(mode="json"))
    return json.loads(job.result.read_text())


@dataclass
class Candidate:
    params: dict[str, Any]
    retention: dict[str, float]  # source dataset name -> ratio
    target: dict[str, float]  # target dataset name -> ratio
    values: dict[str, float]  # dataset name -> the merged model's metric (perplexity or accuracy)
    retention_lower: dict[str, float] = field(default_factory=dict)  # one-sided lower bound of each retention
    intervals: dict[str, list[float]] = field(default_factory=dict)  # dataset name -> ratio interval
    feasible: bool = False
    pareto: bool = False

    @property
    def retention_min(self) -> float:
        return min(self.retention.values())

    @property
    def target_score(self) -> float:
        return sum(self.target.values()) / len(self.target)


@dataclass
class BudgetResult:
    method: str
    grid: dict[str, list[Any]]
    budgets: dict[str, float]  # source dataset name -> minimum retention
    baseline: str
    baseline_values: dict[str, float]
    candidates: list[Candidate]
    chosen: Optional[int] = None
    out: Optional[Path] = None
    splits: list[dict[str, Any]] = field(default_factory=list)
    intervals: dict[str, Any] = field(default_factory=dict)
    heldout: Optional[dict[str, Any]] = None  # the chosen point on the held-out split (the reported numbers)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "method": self.method, "grid": self.grid, "budgets": self.budgets,
            "baseline": {"model": self.baseline, "values": self.baseline_values},
            "definition": "retention = ratio vs baseline (ppl_base/ppl, acc/acc_base); target = mean target ratio; "
                          "candidates are scored on the selection split, feasible when every retention's one-sided "
                          "lower bound clears its budget; 'heldout' reports the chosen point on the held-out split",
            "splits": self.splits, "intervals": self.intervals,
            "candidates": [{"params": c.params, "retention": c.retention, "retention_lower": c.retention_lower,
                            "retention_min": c.retention_min, "target": c.target, "target_score": c.target_score,
                            "intervals": c.intervals, "values": c.values, "feasible": c.feasible, "pareto": c.pareto}
                           for c in self.candidates],
            "pareto": [i for i, c in enumerate(self.candidates) if c.pareto],
            "chosen": self.chosen, "chosen_params": None if self.chosen is None else self.candidates[self.chosen].params,
            "output": None if self.out is None else str(self.out), "heldout": self.heldout,
        }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (≥ in both coordinates, > in one)."""
    return [i for i, (a, b) in enumerate(points)
            if not any((x >= a and y >= b) and (x > a or y > b) for j, (x, y) in enumerate(points) if j != i)]


def search_grid(recipe: Recipe, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The parameters to search and their values, checked against the method's parameter specs."""
    from deltawise.merge.base import REGISTRY

    cls = REGISTRY.get(recipe.merge_method)
    if cls is None:
        raise RecipeError(f"unknown merge_method {recipe.merge_method!r}; available: {', '.join(sorted(REGISTRY))}")
    specs = {p.name: p for p in cls.params}
    if not grid:
        name = next((n for n in STRENGTH if n in specs), None)
        if name is None:
            raise RecipeError(f"{cls.name} has no lambda or t to search; name the parameters with --search-param NAME=v1,v2,...")
        grid = {name: list(DEFAULT_GRID)}
    problems = []
    checked: dict[str, list[Any]] = {}
    for name, values in grid.items():
        if name not in specs:
            problems.append(f"{name}: not a parameter of {cls.name} (known: {', '.join(sorted(specs)) or 'none'})")
            continue
        try:
            checked[name] = [specs[name].coerce(v) for v in values]
        except ParamError as exc:
            problems.append(str(exc))
    if problems:
        raise RecipeError("cannot search:\n" + "\n".join(f"  - {p}" for p in problems))
    return checked


def with_params(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """The recipe with the searched values set recipe-wide and removed from the models' own
    parameters (which would take precedence)."""
    out = recipe.model_copy(deep=True)
    out.parameters = {**out.parameters, **values}
    for entry in out.models:
        for name in values:
            entry.parameters.pop(name, None)
    return out


class _Search:
    def __init__(self, recipe: Recipe, out: Path, options: BudgetOptions, splits: list[Split], work: Path, inputs: list[str]):
        self.recipe, self.out, self.o, self.work = recipe, out, options, work
        self.source_splits, self.target_splits = splits[: len(options.retain)], splits[len(options.retain) :]
        names = unique_names([b.data for b in options.retain] + list(options.targets))
        self.source_names, self.target_names = names[: len(options.retain)], names[len(options.retain) :]
        self.candidates: list[Candidate] = []
        self.tell = options.note or (lambda _m: None)
        self.eval = replace(options.eval, progress=None)
        # what decides every candidate's scores besides its recipe: the inputs as opened, the selection files, scoring
        self.common = {"inputs": inputs, "splits": [_file_digest(s.selection) for s in splits], "device": options.merge.device,
                       "eval": {k: v for k, v in asdict(self.eval).items() if k != "progress"}}

    def evaluate_model(self, ref: str, heldout: bool = False) -> EvalResult:
        pick = (lambda s: s.heldout) if heldout else (lambda s: s.selection)
        return evaluate(ref, [pick(s) for s in self.source_splits], [pick(s) for s in self.target_splits], self.o.eval)

    def job(self, params: dict[str, Any]) -> CandidateJob:
        recipe = with_params(self.recipe, params)
        key = _key({**self.common, "recipe": recipe.model_dump(mode="json")})
        folder = self.work / "candidates" / key
        merge = MergeOptions(device=self.o.merge.device, threads=self.o.merge.threads, shard_size=self.o.merge.shard_size)
        return CandidateJob(recipe, folder, folder.with_suffix(".json"), tuple(s.selection for s in self.source_splits),
                            tuple(s.selection for s in self.target_splits), self.eval, merge, self.o.allow_pickle)

    def run(self, points: list[dict[str, Any]], baseline: EvalResult, tick: Callable[[], None]) -> None:
        """Score ``points`` as jobs of the chosen executor (cached ones are read back) and add them in order."""
        from deltawise.adapt.executors import JobsFailed, executor_for

        jobs = [self.job(params) for params in points]
        cached = [i for i, job in enumerate(jobs) if job.result.is_file()]
        if cached:
            self.tell(f"reusing {len(cached)} finished candidate(s): " + "; ".join(_shown(points[i]) for i in cached))
        executor, threads = executor_for(self.o.executor, len(jobs) - len(cached))
        jobs = [replace(job, threads=threads) for job in jobs]
        done: dict[int, Candidate] = {}

        def finished(i: int, scores: dict[str, Any]) -> None:
            done[i] = self.candidate(points[i], EvalResult.model_validate(scores), baseline)
            tick()

        if executor.name != "inline" and len(jobs) > len(cached):
            self.tell(f"scoring {len(jobs) - len(cached)} candidate(s) with the {executor.name} executor")
        try:
            executor.run(score_candidate, jobs, on_done=finished)
        except JobsFailed as exc:
            raise JobsFailed(exc.failures, exc.total, labels=[_shown(p) for p in points],
                             hint=f"finished candidates are kept in {self.work}: rerun the same command to continue") from None
        self.candidates += [done[i] for i in range(len(points))]

    def candidate(self, params: dict[str, Any], result: EvalResult, baseline: EvalResult) -> Candidate:
        comps = {c.name: c for c in forgetting(result, baseline, self.o.intervals).datasets}
        cand = Candidate(params, {n: comps[n].ratio for n in self.source_names}, {n: comps[n].ratio for n in self.target_names},
                         {n: comps[n].model for n in comps})
        # a dataset without per-item scores has no bound: its point estimate stands in
        cand.retention_lower = {n: comps[n].ratio if comps[n].ratio_lower is None else comps[n].ratio_lower
                                for n in self.source_names}
        cand.intervals = {n: list(c.ratio_ci) for n, c in comps.items() if c.ratio_ci is not None}
        budgets = dict(zip(self.source_names, (b.minimum for b in self.o.retain)))
        cand.feasible = all(cand.retention_lower[n] >= budgets[n] for n in self.source_names)
        lowest = min(cand.retention_lower.values())
        self.tell(f"{_shown(params)}: retention {cand.retention_min:.4f} (lower bound {lowest:.4f}), target "
                  f"{cand.target_score:.4f}{'' if cand.feasible else ' (over budget)'}")
        return cand

    def heldout_report(self, out: Path, baseline_ref: str) -> dict[str, Any]:
        """The written model against the baseline on the held-out split: the numbers to report."""
        baseline = self.evaluate_model(baseline_ref, heldout=True)
        f = forgetting(self.evaluate_model(str(out), heldout=True), baseline, self.o.intervals)
        budgets = dict(zip(self.source_names, (b.minimum for b in self.o.retain)))
        return {
            "retention": {c.name: c.ratio for c in f.datasets if c.role == "source"},
            "retention_ci": {c.name: c.ratio_ci for c in f.datasets if c.role == "source"},
            "target": {c.name: c.ratio for c in f.datasets if c.role == "target"},
            "target_ci": {c.name: c.ratio_ci for c in f.datasets if c.role == "target"},
            "within_budget": all(c.ratio >= budgets[c.name] for c in f.datasets if c.role == "source"),
            "forgetting": f.model_dump(),
        }


def most_retentive(result: "BudgetResult", allowed: bool, tell: Callable[[str], None], *, point: str, remedy: str) -> int:
    """When no point meets the budget: the most retentive one (ties: the better target) if ``allowed``
    (--most-retentive), else ``BudgetNotMet`` naming it; nothing has been written either way."""
    cands = result.candidates
    best = max(range(len(cands)), key=lambda i: (cands[i].retention_min, cands[i].target_score))
    if not allowed:
        budget = ", ".join(f"{n} >= {m:g}" for n, m in result.budgets.items())
        raise BudgetNotMet(f"no {point} meets the retention budget ({budget}); the most retentive, "
                           f"{cands[best].params}, retains {cands[best].retention_min:.4f}. Nothing was written; "
                           f"{remedy} to write that point", result)
    tell(f"no point meets the budget; writing the most retentive one, {cands[best].params}")
    return best


def _best(candidates: list[Candidate]) -> Optional[int]:
    feasible = [i for i, c in enumerate(candidates) if c.feasible]
    if not feasible:
        return None
    return max(feasible, key=lambda i: (candidates[i].target_score, candidates[i].retention_min, -i))


def run_budget(recipe: Recipe, out: str | Path, options: BudgetOptions) -> BudgetResult:
    """Search, report every point, and write the chosen one to ``out`` (see the module docstring).

    The work folder (``options.work``, default ``OUT.budget-work``) holds the splits and every scored
    candidate while the search runs; it is kept when a candidate fails, so that the same command continues
    from it, and removed once the search has decided (a point written, or ``BudgetNotMet``)."""
    out = Path(out)
    options.check()
    grid = search_grid(recipe, options.grid)
    if options.refine and len(grid) != 1:
        raise InputError(f"--refine works on one searched parameter; {len(grid)} are searched ({', '.join(grid)})")
    baseline_ref = options.baseline or recipe.base_model
    if baseline_ref is None:
        raise InputError(f"{recipe.merge_method} recipe has no base_model: name the model retention is measured against "
                         "with --baseline")
    first = build_plan(with_params(recipe, {k: v[0] for k, v in grid.items()}), allow_pickle=options.allow_pickle)
    check_output(first, out, options.merge.overwrite)  # fail before the long search, not after it
    work = Path(options.work) if options.work is not None else out.parent / f"{out.name}.budget-work"
    inputs = [(r.label, folder) for r in first.readers for folder in r.input_folders()]
    inputs += [(r.label, r.path) for r in first.side_readers]
    inputs += [("retain source", b.data) for b in options.retain] + [("target", t) for t in options.targets]
    check_output_folder(work, inputs + [("output", out)], overwrite=True)  # a work folder is resumed, not replaced
    if work.exists() and any(work.iterdir()) and not (work / WORK_MARKER).exists():
        raise OutputError(f"{work} is not empty and is not a budget search's work folder; move it away")
    with output_lock(work, "budget work folder"):
        work.mkdir(exist_ok=True)
        (work / WORK_MARKER).write_text("deltawise budget work folder: scored candidates, reused by a rerun\n")
        fingerprints = [r.fingerprint() for r in first.readers + first.side_readers]
        search = _Search(recipe, out, options, options.splits(work / "splits"), work, fingerprints)
        try:
            result = _search(recipe, out, options, grid, baseline_ref, search)
        except BudgetNotMet:
            shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
        return result


def _search(recipe: Recipe, out: Path, options: BudgetOptions, grid: dict[str, list[Any]], baseline_ref: str,
            search: _Search) -> BudgetResult:
    baseline = search.evaluate_model(baseline_ref)
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    total = len(points) + 2 * options.refine
    tick = options.progress or (lambda _s, _d, _t: None)
    count = 0

    def one_more() -> None:
        nonlocal count
        count += 1
        tick("candidates", count, total)

    search.run(points, baseline, one_more)
    name = next(iter(grid))
    for _ in range(options.refine):
        best = _best(search.candidates)
        if best is None:
            break
        tried = sorted({c.params[name] for c in search.candidates})
        v = search.candidates[best].params[name]
        if not isinstance(v, float):
            break  # midpoints of an integer or choice parameter are not values of it
        at = tried.index(v)
        mids = [(v + neighbour) / 2 for neighbour in tried[max(0, at - 1) : at] + tried[at + 1 : at + 2]]
        search.run([{name: mid} for mid in mids if all(abs(mid - t) > 1e-12 for t in tried)], baseline, one_more)
    cands = search.candidates
    for i in pareto_front([(c.retention_min, c.target_score) for c in cands]):
        cands[i].pareto = True
    result = BudgetResult(
        method=recipe.merge_method, grid=grid, budgets=dict(zip(search.source_names, (b.minimum for b in options.retain))),
        baseline=baseline_ref, baseline_values={d.name: d.value for d in baseline.datasets}, candidates=cands,
        chosen=_best(cands), splits=[s.to_json() for s in search.source_splits + search.target_splits],
        intervals=options.intervals.describe(),
    )
    if result.chosen is None:
        result.chosen = most_retentive(result, options.most_retentive, search.tell, point="searched point",
                                       remedy="lower the budget, search smaller values, or pass --most-retentive")
    run_merge(build_plan(with_params(recipe, cands[result.chosen].params), allow_pickle=options.allow_pickle), out, options.merge)
    result.out = out
    search.tell("evaluating the written merge on the held-out split")
    result.heldout = search.heldout_report(out, baseline_ref)
    return result


def _shown(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _key(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def budget_table(result: BudgetResult):
    """The searched points as a rich table: Pareto points starred, the chosen one marked."""
    from rich.table import Table

    table = Table(title=f"{result.method}: retention budget search on the selection split (baseline {result.baseline})")
    for name in result.grid:
        table.add_column(name, justify="right")
    for name, minimum in result.budgets.items():
        table.add_column(f"retention {name} \\[lower bound ≥ {minimum:g}]", justify="right")  # \\[ is a bracket, not rich markup
    for name in result.candidates[0].target if result.candidates else []:
        table.add_column(f"target {name}", justify="right")
    for col in ("within budget", "Pareto", "chosen"):
        table.add_column(col, justify="center")
    order = sorted(range(len(result.candidates)), key=lambda i: [result.candidates[i].params[n] for n in result.grid])
    for i in order:
        c = result.candidates[i]
        table.add_row(*[f"{c.params[n]:g}" if isinstance(c.params[n], float) else str(c.params[n]) for n in result.grid],
                      *[f"{c.retention[n]:.4f} [{c.retention_lower.get(n, c.retention[n]):.4f}]" for n in result.budgets],
                      *[f"{v:.4f}" for v in c.target.values()],
                      "yes" if c.feasible else "no", "*" if c.pareto else "", "<-" if i == result.chosen else "")
    level = result.intervals.get("level", 0.95)
    table.caption = ("retention and target: ratio to the baseline (ppl_base/ppl, acc/acc_base); > 1 is better; "
                     f"\\[lower bound]: one-sided {level:.0%} paired bootstrap bound, which must clear the budget")
    return table


def heldout_lines(result: BudgetResult) -> list[str]:
    """The chosen point's held-out numbers, with their intervals: what the search reports."""
    held = result.heldout
    level = result.intervals.get("level", 0.95)
    lines = []
    for kind in ("retention", "target"):
        for name, value in held[kind].items():
            ci = held[f"{kind}_ci"][name]
            shown = f"{value:.4f}" if ci is None else f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
            budget = f" (budget {result.budgets[name]:g})" if kind == "retention" else ""
            lines.append(f"held out: {kind} {name} {shown}{budget}")
    verdict = "meets" if held["within_budget"] else "does NOT meet"
    lines.append(f"held out: the chosen point {verdict} the budget on data it was not chosen on "
                 f"({level:.0%} paired bootstrap intervals)")
    return lines
