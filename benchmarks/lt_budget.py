"""The forgetting-budget rows of the long language-transfer benchmark (language_transfer_long.py; issue 18):
full fine-tuning with deltawise's tools for training under a retention budget, each budget on English prose
(``--retain-budget``, default 0.98), each row reported like every other run of the benchmark.

* full-guard: ``train --retain ... --interpolate`` (adapt/guarded.py) at full's usual rate and at the top of
  its sweep (the rate that forgets); the guard's defaults otherwise (checks every as many steps as keep them at
  about 10% of the time, no early stop);
* full-guard-refine: the same at the top rate with ``--interpolate-refine 2`` (two rounds of midpoints around
  each searched line's best λ within the budget);
* full-repair: ``repair`` (search/repair.py) of the unguarded full fine-tune at the top rate (full's run of
  the same rate and seed, trained first when missing);
* full-lr-sweep: ``lr-sweep`` (search/lr_sweep.py) over full's rates, short runs (``--lr-sweep-steps``) on
  the first ``--lr-sweep-examples`` German training texts, then the full-length run at the recommended
  rate, which is full's run of that rate and seed (shared with the full row; trained when missing). When no
  rate is within the budget, the one with the largest retention lower bound is taken, as ``--most-retentive``
  does for repair (also set here) and the budget merges.

Selection: every choice these tools make (the guard's checkpoint and interpolation, repair's edits, the
sweep's rate) sees only the selection sets, WORK/data/select/{english_prose,german}.jsonl (budget source and
target), which each tool cuts again into a choosing half and a held-out half of its own (the default
``--heldout-fraction`` 0.5); no evaluation set is given to any of them. The row's numbers are the
benchmark's evaluation of the written model on the evaluation sets, as for every other row.

Cost: wall seconds, summed over the invocations that worked on a stage (one killed outright loses its
share). Evaluation on the evaluation sets is the benchmark's measurement and counts in no row.
* full-guard and full-guard-refine, total: the whole guarded run (loading, the baseline and held-out scoring, checkpoints);
  parts: ``train`` (optimizer steps) and ``monitor`` (the periodic checks), both from the guard's record,
  and ``interpolate`` (after training: writing, the two --interpolate searches);
* full-repair: ``train`` (the unguarded fine-tune it repairs) + ``search`` (repair, with its held-out report);
* full-lr-sweep: ``search`` (the sweep's short runs and their scoring) + ``train`` (the full-length run);
* full, lora and the other methods: ``train``.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import lt_methods
import lt_report
from language_transfer import console
from lt_methods import FULL, Data, Run, eval_options

GUARD_RECORD = "deltawise_guard.json"  # adapt/guarded.py's RECORD, in the guarded run's output
REPAIR_RECORD = "repair.json"  # repair's deltawise_repair.json, kept when the repaired model is pruned
SWEEP_RECORD = "sweep.json"  # lr-sweep's sweep.json and the rate the row took
TOOL_RECORDS = {"guard": f"train/{GUARD_RECORD}", "repair": REPAIR_RECORD, "lr-sweep": SWEEP_RECORD}  # in the row's folder


@dataclass
class Bench:
    """What a row needs of the benchmark: the base, the sets, the base's evaluation, the options, how to evaluate
    a model (language_transfer_long.evaluate) and how to get another run's row (its run_one, without budget merge;
    ``prerequisite(run, True)`` also when the run's model is wanted: a recorded run is then trained again)."""

    base: Path
    data: Data
    base_eval: Any
    args: Any
    evaluate: Callable[..., Any]
    prerequisite: Callable[[Run, bool], dict]

    def folder(self, run: Run) -> Path:
        return self.args.work / "runs" / run.key


def budgets(data: Data, args) -> list:
    from deltawise.search.budget import RetentionBudget

    return [RetentionBudget(data.prose_select, args.retain_budget)]


@contextmanager
def clock(seconds: dict[str, float], key: str, folder: Path) -> Iterator[None]:
    """Adds the block's wall seconds to ``seconds[key]`` and saves them, also when the block is interrupted."""
    from deltawise.io.writer import write_json_atomic

    t0 = time.time()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.time() - t0
        write_json_atomic(folder / "seconds.json", seconds)


def status(run: Run, read: Callable[[Run, str], Optional[dict]]) -> tuple[bool, bool]:
    """(the tool's stage is done, the row is evaluated), for --plan; ``read(run, name)``: the file ``name`` of the run's
    folder, or None (the work folder's, or its record's)."""
    record = read(run, TOOL_RECORDS[run.method.tool])
    if run.method.tool == "lr-sweep":
        if record is None:
            return False, False
        full = Run(FULL, record["row_lr"], run.seed)
        return read(full, "train/deltawise_train.json") is not None, read(full, "eval.json") is not None
    from deltawise.adapt.guarded import searches_pending

    if record is not None and run.method.tool == "guard" and searches_pending(record):
        record = None  # trained, its searches interrupted: the stage is not done
    return record is not None, read(run, "eval.json") is not None


def run_row(run: Run, bench: Bench) -> dict:
    """Run (or read back) one forgetting-budget row: each stage cached in the run's folder."""
    folder = bench.folder(run)
    folder.mkdir(parents=True, exist_ok=True)
    times = folder / "seconds.json"
    seconds = json.loads(times.read_text()) if times.is_file() else {}
    stage = {"guard": guarded, "repair": repaired, "lr-sweep": swept}[run.method.tool]
    eval_file, lr, cost, tool = stage(run, bench, folder, seconds)
    from deltawise.eval.results import load_result

    return {"key": run.key, "label": run.method.label, "lr": lr, "seed": run.seed, "steps": bench.args.steps,
            "seconds": seconds, **lt_report.measures(load_result(eval_file), bench.data), "budget": None,
            "cost": cost, "tool": tool}


def cached(path: Path, args) -> dict:
    """A tool's record, refused when it was made under another budget (the row would not be the one asked for)."""
    record = json.loads(path.read_text())
    if list(record["budgets"].values()) != [args.retain_budget]:
        raise SystemExit(f"{path} was made with the retention budget {record['budgets']}, not --retain-budget "
                         f"{args.retain_budget:g}: use another --work")
    return record


def _cost(parts: dict[str, Optional[float]], total: Optional[float] = None) -> dict[str, Any]:
    known = [v for v in parts.values() if v is not None]
    return {"total": total if total is not None else (sum(known) if len(known) == len(parts) else None), "parts": parts}


def guarded(run: Run, bench: Bench, folder: Path, seconds: dict) -> tuple[Path, float, dict, dict]:
    """Guarded full fine-tuning with --interpolate into ``folder/train`` (a full model either way: the kept
    checkpoint or an interpolated point), resumed from its last checkpoint when it was interrupted while training."""
    from deltawise.adapt.guarded import GuardRequest, guarded_train, searches_pending
    from deltawise.options import GuardOptions

    out, data, args = folder / "train", bench.data, bench.args
    if not (out / GUARD_RECORD).is_file() or searches_pending(json.loads((out / GUARD_RECORD).read_text())):
        options = GuardOptions(interpolate=True, interpolate_refine=run.method.refine)
        request = GuardRequest(retain=budgets(data, args), targets=[data.german_select], options=options,
                               eval_max_length=eval_options(args).max_length, eval_batch_size=args.eval_batch_size)
        lt_methods.require_compute(args)
        ended = training_end()
        with clock(seconds, "guarded", folder):
            guarded_train(lt_methods.train_config(run, bench.base, data, out, args), request,
                          note=lambda message: console.print(f"    {message}"), callbacks=[ended])
            seconds["interpolate"] = time.time() - ended.at
    record = cached(out / GUARD_RECORD, args)
    eval_file = folder / "eval.json"
    if not eval_file.is_file():
        bench.evaluate(out, run.key, data, eval_file, bench.base_eval, args)
    monitor = record["monitor"]
    cost = _cost({"train": monitor["train_seconds"], "monitor": monitor["monitor_seconds"],
                  "interpolate": seconds.get("interpolate")}, total=seconds.get("guarded"))
    chosen = record["chosen"]
    tool = {"choice": chosen["point"] + ("" if chosen.get("step") is None else f" (step {chosen['step']})"),
            "budget_met_on_monitor": record["budget_met"], "checks": monitor["checks"],
            # records before chosen.within_budget: only a feasible interpolated point can win over the kept one
            "written_within_budget_on_monitor": chosen.get("within_budget", record["budget_met"] or "segment" in chosen),
            "selection_files": [s["file"] for s in record["splits"]], "guard_heldout": chosen.get("heldout")}
    return eval_file, run.lr, cost, tool


def training_end():
    """A transformers callback noting when training ended: what follows is the guard's --interpolate stage."""
    from transformers import TrainerCallback

    class TrainingEnd(TrainerCallback):
        at = 0.0

        def on_train_end(self, args, state, control, **kwargs):
            self.at = time.time()

    return TrainingEnd()


def repaired(run: Run, bench: Bench, folder: Path, seconds: dict) -> tuple[Path, float, dict, dict]:
    """``repair`` of full's unguarded run at the same rate and seed; the repaired model is dropped once evaluated
    (it is the fine-tune with the recorded edits)."""
    from deltawise.search.repair import REPORT, RepairOptions, describe, run_repair

    data, args = bench.data, bench.args
    full = Run(FULL, run.lr, run.seed)
    out, record_file, eval_file = folder / "repaired", folder / REPAIR_RECORD, folder / "eval.json"
    full_row = bench.prerequisite(full, not eval_file.is_file() and not (out / REPORT).is_file())
    if record_file.is_file():
        cached(record_file, args)
    if not eval_file.is_file():
        if not (out / REPORT).is_file():
            lt_methods.require_compute(args)
            options = RepairOptions(budgets(data, args), [data.german_select], most_retentive=True, overwrite=True,
                                    eval=eval_options(args), note=lambda message: console.print(f"    repair: {message}"))
            with clock(seconds, "repair", folder):
                run_repair(str(bench.folder(full) / "train"), str(bench.base), out, options)
        shutil.copy2(out / REPORT, record_file)
        bench.evaluate(out, run.key, data, eval_file, bench.base_eval, args)
    shutil.rmtree(out, ignore_errors=True)
    record = cached(record_file, args)
    chosen = record["candidates"][record["chosen"]]
    cost = _cost({"train": full_row["seconds"].get("train"), "search": seconds.get("repair")})
    tool = {"choice": describe(chosen["params"]), "budget_met_on_selection": chosen["feasible"], "repaired": full.key,
            "evaluations": len(record["candidates"]), "selection_files": [s["file"] for s in record["splits"]],
            "repair_heldout": {k: record["heldout"][k] for k in ("retention", "retention_ci", "target", "target_ci")}}
    return eval_file, run.lr, cost, tool


def swept(run: Run, bench: Bench, folder: Path, seconds: dict) -> tuple[Path, float, dict, dict]:
    """``lr-sweep`` over full's rates on a subset, then full's full-length run at the rate it recommends."""
    from deltawise.io.writer import write_json_atomic

    record_file = folder / SWEEP_RECORD
    if not record_file.is_file():
        with clock(seconds, "sweep", folder):
            result = sweep(run, bench, folder / "sweep")
        record = result.to_json()
        runs = record["runs"]
        if result.recommended is None:  # no rate within the budget: the most retentive one
            taken = max(runs, key=lambda r: (min(r["selection"]["retention_lower"].values()), -r["lr"]))
            record["row_why"] = "none within the budget: the largest retention lower bound"
        else:
            taken = runs[result.recommended]
            record["row_why"] = "recommended"
        record["row_lr"] = taken["lr"]
        write_json_atomic(record_file, record)
        for weights in (folder / "sweep" / "runs").glob("*/*.safetensors"):  # the short runs' models; their scores stay
            weights.unlink()
    record = cached(record_file, bench.args)
    full = Run(FULL, record["row_lr"], run.seed)
    full_row = bench.prerequisite(full, False)
    cost = _cost({"search": seconds.get("sweep"), "train": full_row["seconds"].get("train")})
    tool = {"choice": f"lr {record['row_lr']:g} ({record['row_why']})", "recommended_lr": record["recommended_lr"],
            "full_length_run": full.key, "short_runs": {f"{r['lr']:g}": {"feasible": r["feasible"], "train_seconds":
                                                                          r["train_seconds"]} for r in record["runs"]},
            "selection_files": [s["file"] for s in record["splits"]]}
    return bench.folder(full) / "eval.json", record["row_lr"], cost, tool


def sweep_steps(args) -> int:
    """The steps of each of full-lr-sweep's short runs."""
    return args.lr_sweep_steps or max(1, args.steps // 4)


def sweep(run: Run, bench: Bench, out: Path):
    from deltawise.search.lr_sweep import SweepOptions, run_lr_sweep

    data, args = bench.data, bench.args
    lt_methods.require_compute(args)
    steps = sweep_steps(args)
    # full's settings but what the sweep sets itself (rate, steps) or takes as arguments (model, data)
    training = {k: v for k, v in lt_methods.settings(Run(FULL, None, run.seed), bench.base, data, args).items()
                if k not in ("model", "data", "lr", "progress", "overwrite")}
    scoring = eval_options(args)
    scoring.device = "cuda" if args.device.startswith("cuda") else "cpu"  # the runs are scored where they trained
    options = SweepOptions(budgets(data, args), [data.german_select], lrs=run.method.lrs, steps=steps, method=FULL.method,
                           training=training, max_examples=args.lr_sweep_examples, eval=scoring,
                           note=lambda message: console.print(f"    lr-sweep: {message}"))
    return run_lr_sweep(str(bench.base), data.german_train, out, options)
