"""Greedy soup (Wortsman et al. 2022, "Model soups", ICML 2022, arXiv 2203.05482).

1. Score every ingredient on held-out data; sort by score, best first (ties keep the given order).
2. soup = [best]. For each next ingredient: the candidate is the uniform average of the soup's
   members and it, (sum of members + theta_i) / (n + 1) in float32; keep it if its score beats the
   soup's (strictly, as the official code; ``accept_ties`` accepts equal scores), else drop it for good.
3. The soup is written by the merge engine as a ``linear`` merge of the members in the order they
   joined: the same float32 arithmetic as the candidate that was scored, written atomically with
   the manifest, and ``soup.json`` (every score and decision) inside the output folder.
4. Steps 1-2 score on a selection split of the data; the soup and the best single ingredient are
   then scored on the held-out split (search/splits.py: a seeded cut, or a ``heldout`` file), and the
   soup's score relative to that ingredient is reported with a paired bootstrap interval
   (eval/intervals.py). A fraction of 0 keeps every item for the selection and reports in-sample, with
   a warning.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from deltawise.data.tasks import head_for, load_data
from deltawise.stats.names import checkpoint_names
from deltawise.search.scoring import Score, resolve_metric, score_model
from deltawise.errors import InputError
from deltawise.eval.models import LoadedModel, load_model
from deltawise.io.output import check_output_folder
from deltawise.delta.reader import open_model
from deltawise.io.resolve import resolve_model
from deltawise.options import IntervalOptions, SplitOptions
from deltawise.search.splits import make_splits

State = dict[str, torch.Tensor]


@dataclass
class SoupOptions:
    metric: str = "auto"
    accept_ties: bool = False
    task: str = "auto"
    max_examples: Optional[int] = None
    max_length: int = 256
    batch_size: int = 8
    device: str = "cpu"
    threads: int = 2
    overwrite: bool = False
    split: SplitOptions = field(default_factory=SplitOptions)
    heldout: Optional[Path] = None  # a held-out file instead of cutting the data
    intervals: IntervalOptions = field(default_factory=IntervalOptions)
    progress: Optional[Callable[[int, int], None]] = None
    trust_remote_code: bool = False  # run Python code shipped in a model folder (--trust-remote-code)


@dataclass
class Step:
    model: str
    ingredient_value: float  # the model alone
    candidate_value: Optional[float]  # the soup with it (None for the first member)
    accepted: bool
    soup_size: int  # members after this decision


@dataclass
class SoupResult:
    metric: str
    data: str
    accept_ties: bool
    steps: list[Step]
    members: list[str]
    value: float  # the soup's metric on the selection split
    out: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    split: Optional[dict] = None  # the selection/held-out cut (files, item counts)
    heldout: Optional[dict] = None  # the soup and the best ingredient on the held-out split

    def to_json(self) -> dict:
        return asdict(self)


def greedy_select(ranked: list[tuple[str, Score]], load: Callable[[str], State], score: Callable[[State], Score],
                  accept_ties: bool = False) -> tuple[list[Step], list[str], Score]:
    """The greedy pass over ``ranked`` (best first). ``load`` gives a model's float32 tensors,
    ``score`` evaluates a state; returns the decisions, the members and the soup's score."""
    first, best = ranked[0]
    total = {k: v.float().clone() for k, v in load(first).items()}
    members = [first]
    steps = [Step(first, best.value, None, True, 1)]
    for model, alone in ranked[1:]:
        theta = load(model)
        n = len(members)
        candidate = {k: (total[k] + theta[k].float()) / (n + 1) for k in total}
        got = score(candidate)
        accepted = got.score > best.score or (accept_ties and got.score == best.score)
        if accepted:
            for k in total:
                total[k].add_(theta[k].float())
            members.append(model)
            best = got
        steps.append(Step(model, alone.value, got.value, accepted, len(members)))
    return steps, members, best


class _Vessel:
    """One loaded network whose parameters are overwritten by each state to score."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        reader = open_model(str(lm.path))
        try:
            self.names = checkpoint_names(lm.model, reader)
        finally:
            reader.close()
        self.params = dict(lm.model.named_parameters())

    def load(self, ref: str) -> State:
        reader = open_model(ref)  # a model, or a delta or adapter folder on its base
        try:
            missing = [c for c in self.names.values() if c not in reader]
            if missing:
                raise InputError(f"model {ref!r} lacks tensors the soup needs: {', '.join(missing[:5])}")
            return {c: reader.get(c).float() for c in self.names.values()}
        finally:
            reader.close()

    @torch.no_grad()
    def set(self, state: State) -> None:
        for param_name, ckpt in self.names.items():
            p = self.params[param_name]
            if tuple(state[ckpt].shape) != tuple(p.shape):
                raise InputError(f"tensor {ckpt!r} has shape {tuple(state[ckpt].shape)}, the soup's is {tuple(p.shape)}")
            p.copy_(state[ckpt])


def greedy_soup(models: list[str], data: Path, out: Path, options: SoupOptions) -> SoupResult:
    if len(models) < 2:
        raise InputError("a greedy soup needs at least two ingredient models")
    paths = [resolve_model(m) for m in models]
    check_output_folder(out, [(m, p) for m, p in zip(models, paths)], options.overwrite)
    if options.split.heldout_fraction == 0 and options.heldout is None:
        return _soup(models, data, None, out, options)
    folder = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.soup-splits-", dir=Path(out).parent))
    try:
        split = make_splits([data], [options.heldout] if options.heldout else None, options.split.heldout_fraction,
                            options.split.split_seed, folder)[0]
        return _soup(models, split.selection, split, out, options)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _soup(models: list[str], data: Path, split, out: Path, options: SoupOptions) -> SoupResult:
    from deltawise.merge import MergeOptions, build_plan, parse_recipe, run_merge

    task_data = load_data(data, options.task, limit=options.max_examples)
    metric = resolve_metric(task_data.task, options.metric)
    vessel = _Vessel(load_model(models[0], head_for(task_data.task), device=options.device,
                                trust_remote_code=options.trust_remote_code))

    def score(state: State) -> Score:
        vessel.set(state)
        return score_model(vessel.lm, task_data, metric, max_length=options.max_length, batch_size=options.batch_size)

    done = [0]

    def counted(state: State) -> Score:
        result = score(state)
        done[0] += 1
        if options.progress:
            options.progress(done[0], 2 * len(models) - 1)
        return result

    alone = [(m, counted(vessel.load(m))) for m in models]
    ranked = sorted(alone, key=lambda pair: -pair[1].score)  # stable: ties keep the given order
    steps, members, best = greedy_select(ranked, vessel.load, counted, options.accept_ties)
    result = SoupResult(metric, str(data if split is None else split.source), options.accept_ties, steps, members, best.value)
    if split is None:
        result.warnings.append("the soup's score is in-sample: it was chosen and scored on the same items "
                               "(a held-out fraction above 0, or a held-out file, reports it on others)")
    else:
        result.split = split.to_json()
        result.heldout = _heldout_report(vessel, members, ranked[0][0], split.heldout, options)
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": m} for m in members]}, "greedy soup")
    plan = build_plan(recipe)
    merged = run_merge(plan, out, MergeOptions(device=options.device, threads=options.threads, overwrite=options.overwrite,
                                               extra_files={"soup.json": json.dumps(_with_out(result, out), indent=2) + "\n"}))
    result.out = str(merged.out)
    result.warnings += merged.warnings
    return result


def _with_out(result: SoupResult, out: Path) -> dict:
    data = result.to_json()
    data["out"] = str(out)
    return data


def _heldout_report(vessel: _Vessel, members: list[str], best_ingredient: str, heldout: Path,
                    options: SoupOptions) -> dict:
    """The soup and the ingredient ranked first, scored on the held-out items with ``deltawise eval``'s scoring;
    the soup relative to that ingredient with a paired bootstrap interval."""
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.results import EvalResult
    from deltawise.search.scoring import as_result, score_data

    held = load_data(heldout, options.task)

    def scored(state: State, label: str) -> EvalResult:
        vessel.set(state)
        return as_result(label, [score_data(vessel.lm, held, name="heldout", max_length=options.max_length,
                                            batch_size=options.batch_size)])

    total = {k: v.clone() for k, v in vessel.load(members[0]).items()}
    for member in members[1:]:  # the float32 sum in joining order, as the greedy pass formed it
        for k, v in vessel.load(member).items():
            total[k].add_(v)
    soup_state = {k: v / len(members) for k, v in total.items()}
    soup, alone = scored(soup_state, "soup"), scored(vessel.load(best_ingredient), best_ingredient)
    comparison = forgetting(soup, alone, options.intervals).datasets[0]
    return {"data": str(heldout), "items": len(held.items), "metric": soup.datasets[0].metric,
            "soup": soup.datasets[0].value, "best_ingredient": {"model": best_ingredient, "value": alone.datasets[0].value},
            "ratio_to_best_ingredient": comparison.ratio, "ratio_ci": comparison.ratio_ci,
            "intervals": options.intervals.describe()}
