"""``--interpolate``: after a guarded run, the retention-budget search (search/budget.py) along two segments,

    WiSE-FT   θ(λ) = θ_base + λ (θ_final − θ_base)        (Wortsman et al. 2022, arXiv 2109.01903)
    kept→final θ(λ) = θ_kept + λ (θ_final − θ_kept)

each a ``task_arithmetic`` recipe with λ searched at the budget search's grid (0.2 … 1.0), then
``--interpolate-refine`` rounds of midpoints around the best point within the budget (at a high learning
rate the budget is often crossed between two grid points, and the 0.2 step gives away the gain between
them). The searches choose on the guard's monitor split (so their scores compare with the kept checkpoint's) and
report on its held-out split; retention is always against the base. The written model is the one with
the largest target score among the kept checkpoint and each segment's best point within the budget;
the kept checkpoint wins ties (it needs no merge). An interpolated point is a full model: adapters
are folded into the weights first (adapt/materialize.py). ``chosen.within_budget`` says whether the
written point cleared the budget on the monitor split; ``budget_met`` keeps its meaning of "some
checked step did", so a run whose steps all missed it can still write an interpolated point within it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from deltawise.adapt.guard import TRAIN_RECORD, GuardState, MonitorData, evaluation_options
from deltawise.adapt.guard_searches import FINAL
from deltawise.adapt.materialize import materialize
from deltawise.adapt.train import TrainConfig
from deltawise.eval.runner import EvalOptions
from deltawise.io.output import staged_output
from deltawise.io.writer import write_json_atomic
from deltawise.merge.engine import MergeOptions
from deltawise.merge.recipe import parse_recipe
from deltawise.search.budget import BudgetNotMet, BudgetOptions, BudgetResult, RetentionBudget, run_budget

SEGMENTS = {"wise-ft": "WiSE-FT point base + λ·(final − base)", "kept-final": "point kept + λ·(final − kept)"}


def segment_recipe(start: Path, final: Path) -> Any:
    """θ_start + λ (θ_final − θ_start) as a recipe whose ``lambda`` the budget search sets."""
    return parse_recipe({"merge_method": "task_arithmetic", "base_model": str(start),
                         "models": [{"model": str(final), "parameters": {"weight": 1.0}}]}, "guard interpolation")


def search_segment(start: Path, final: Path, out: Path, model_path: Path, data: MonitorData, request,
                   evaluation: EvalOptions, tell: Callable[[str], None]) -> BudgetResult:
    """The budget search along one segment, choosing on the monitor split and reporting on the held-out split."""
    sources, targets = data.splits[: len(data.budgets)], data.splits[len(data.budgets) :]
    options = BudgetOptions(
        retain=[RetentionBudget(s.selection, minimum) for s, minimum in zip(sources, data.budgets.values())],
        targets=[s.selection for s in targets], baseline=str(model_path),
        heldout_retain=[s.heldout for s in sources], heldout_targets=[s.heldout for s in targets],
        eval=evaluation, intervals=request.intervals, refine=request.options.interpolate_refine,
        merge=MergeOptions(overwrite=True, restart=True),  # ``out`` is in the run's work folder: a rerun replaces its own
        note=tell,
    )
    try:
        return run_budget(segment_recipe(start, final), out, options)
    except BudgetNotMet as exc:
        return exc.result


def _summary(result: BudgetResult) -> dict[str, Any]:
    return {k: v for k, v in result.to_json().items() if k in ("grid", "candidates", "pareto", "chosen", "chosen_params")}


def _heldout(held: dict[str, Any]) -> dict[str, Any]:
    """The budget search's held-out report in the guard's terms (retention per source, mean target gain)."""
    f = held["forgetting"]
    return {"retention": held["retention"],
            "retention_ci": {k: None if v is None else list(v) for k, v in held["retention_ci"].items()},
            "gain": f["target_gain"], "gain_ci": f["target_gain_ci"], "within_budget": held["within_budget"]}


def interpolate_training(cfg: TrainConfig, request, model_path: Path, state: GuardState, data: MonitorData,
                         record: dict[str, Any], work: Path, tell: Callable[[str], None]) -> dict[str, Any]:
    """``--interpolate`` after ``train``: the final weights (saved by the guard under ``work/final``) and the kept
    checkpoint (the output) as full models, then ``interpolate``. ``state``: the guard's at the end of training."""
    trust = cfg.trust_remote_code
    final = materialize(work / FINAL, model_path, work / "final_model", trust_remote_code=trust)
    kept_step, last_step = state.kept_step, state.points[-1].step
    kept = None if kept_step == last_step else materialize(cfg.output, model_path, work / "kept_model", trust_remote_code=trust)
    embed = {"train": json.loads((cfg.output / TRAIN_RECORD).read_text())}
    return interpolate(cfg.output, request, model_path, data, record, work, evaluation_options(cfg, request), tell,
                       final=final, kept=kept,
                       budget_met=state.budget_met, steps=(kept_step, last_step), carry=["training_log.json"], embed=embed)


def interpolate(output: Path, request, model_path: Path, data: MonitorData, record: dict[str, Any], work: Path,
                evaluation: EvalOptions, tell: Callable[[str], None], *, final: Path, kept: Path | None, budget_met: bool,
                steps: tuple[Any, Any], carry: list[str], embed: dict[str, Any]) -> dict[str, Any]:
    """Search both segments (only WiSE-FT when ``kept`` is None: the kept point is the final one), write the
    winner to ``output`` (atomically; with the ``carry`` files of the old output and ``embed`` in its record)
    and return the updated record."""
    kept_step, last_step = steps
    starts = {"wise-ft": model_path}
    if kept is not None:
        starts["kept-final"] = kept
    kept_choice = record["chosen"]
    # the kept checkpoint's target score on the monitor split, as the searches score theirs (mean target ratio)
    gain = kept_choice["monitor"]["gain"] if kept_choice["monitor"] else None
    best_kept = 1.0 + gain if budget_met and gain is not None else None
    best = ("kept", best_kept)
    searches: dict[str, Any] = {}
    results: dict[str, BudgetResult] = {}
    for name, start in starts.items():
        tell(f"guard: searching the {SEGMENTS[name]}")
        results[name] = search_segment(start, final, work / f"search-{name}", model_path, data, request, evaluation, tell)
        searches[name] = _summary(results[name])
        chosen = results[name].chosen
        if results[name].out is not None and results[name].candidates[chosen].feasible:
            score = results[name].candidates[chosen].target_score
            if best[1] is None or score > best[1]:
                best = (name, score)
    record = {**record, "interpolation": searches}
    if best[0] == "kept":
        why = kept_choice["why"] + "; no interpolated point within the budget has a larger target score"
        record["chosen"] = {**kept_choice, "why": why + (f" (kept: {best[1]:.4f})" if best[1] is not None else "")}
        write_json_atomic(output / "deltawise_guard.json", record)
        return record
    name, score = best
    result = results[name]
    lam = result.candidates[result.chosen].params["lambda"]
    record["chosen"] = {
        "point": f"{SEGMENTS[name]} at λ = {lam:g}", "segment": name, "lambda": lam, "within_budget": True,
        "step": None, "kept_step": kept_step, "final_step": last_step,
        "why": f"the largest target score within the budget on the monitor split ({score:.4f}; the kept checkpoint's: "
               f"{'not within the budget' if best_kept is None else format(best_kept, '.4f')})",
        "heldout": _heldout(result.heldout), "monitor": {"target_score": score, **_candidate(result)},
    }
    record.update(embed)  # e.g. the training run's record: the folder now holds a full model, not the method's output
    with staged_output(output, overwrite=True) as staging:
        for item in Path(result.out).iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        for name in carry:
            if (output / name).exists():
                shutil.copy2(output / name, staging / name)
        (staging / "deltawise_guard.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _candidate(result: BudgetResult) -> dict[str, Any]:
    c = result.candidates[result.chosen]
    return {"retention": c.retention, "retention_lower": c.retention_lower, "target": c.target}
