"""``train`` and ``bam``: one training run, and Branch-and-Merge rounds of them.

Both read the same option groups (``TrainingOptions``, ``MethodChoice``) and differ only in a few
defaults, so their ``--help`` lists the same training options."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer

from deltawise.commands.console import (ProgressReporter, escape, no_transformers_bars, note, out, quiet_libraries,
                                        steps_progress, warn)
from deltawise.commands.flags import options
from deltawise.options import (BAM_EXECUTOR, BudgetSearchOptions, CheckpointOptions, DataOptions, EngineOptions, ExecutorOptions,
                               GuardOptions, LoadOptions, MethodChoice, RunOptions, SplitOptions, TrainingOptions)

DATA_HELP = ("training data: text (documents separated by % lines or blank lines), JSONL (text | prompt+response | "
             "chat messages | text+label) or a datasets folder")
# bam restarts the schedule in every branch and starts each from a merged full model
# --retain/--target come from the budget search's group; their help says what they mean to a training run
GUARD_BUDGET = {"only": ("retain", "target", "eval_max_length", "eval_batch_size"), "override": {
    "retain": {"help": "forgetting budget SOURCE:MIN (repeatable): keep the best checkpoint whose retention on SOURCE "
                       "(lower confidence bound) is >= MIN, e.g. en.jsonl:0.98"},
    "target": {"help": "--retain: data whose gain picks the checkpoint (default: a held-out tenth of --data)"},
    "eval_max_length": {"help": "--retain: tokens per scoring window (default: --max-length)"},
    "eval_batch_size": {"help": "--retain: sequences per scoring forward pass"}}}
GUARD_SPLIT = {"heldout_fraction": {"help": "--retain: share of each --retain/--target file's items held out to report the "
                                            "written model on; the rest is the monitor split"},
               "split_seed": {"help": "--retain: seed of the monitor/held-out cut"}}
BAM_TRAINING_DEFAULTS = {"lr": {"default": 5e-5}, "schedule": {"default": "cpt"}, "warmup": {"default": 0.01}}


def resolve_task(data: Path, task: str) -> str:
    """``auto`` as the data-driven commands read it: classification when the first JSONL record
    carries a ``label``, else causal LM. Unreadable data is left to the training run to report."""
    if task != "auto":
        return task
    try:
        with open(data, encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
        record = json.loads(first)
    except (OSError, ValueError):
        return "causal_lm"
    return "classification" if isinstance(record, dict) and "label" in record else "causal_lm"


def method_params(choice: MethodChoice) -> dict[str, Any]:
    """``--method-param`` and the deprecated per-parameter flags as one NAME -> value dictionary."""
    for flag in choice.used_legacy_flags():
        warn(f"{flag} is deprecated; use -p/--method-param NAME=VALUE")
    return choice.params()


@options("engine", EngineOptions, only=("allow_pickle",),
         override={"allow_pickle": {"help": "accept a .bin/.pt base model (read with torch.load(weights_only=True))"}})
@options("load", LoadOptions)
@options("checkpoint", CheckpointOptions)
@options("choice", MethodChoice)
@options("training", TrainingOptions)
@options("data_options", DataOptions, only=("task",))
@options("run", RunOptions, exclude=("device",), override={
    "output": {"help": "output folder (written atomically; must not be an input)"},
    "quiet": {"help": "print nothing but errors and the result line"},
    "overwrite": {"help": "replace a non-empty output folder once training succeeds"}})
@options("budget", BudgetSearchOptions, **GUARD_BUDGET)
@options("guard", GuardOptions)
@options("split", SplitOptions, override=GUARD_SPLIT)
def train(
    model: Path = typer.Argument(..., help="base model: a Hugging Face folder or a .gguf file (converted once, cached)"),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    run: RunOptions = ...,
    data_options: DataOptions = ...,
    training: TrainingOptions = ...,
    choice: MethodChoice = ...,
    checkpoint: CheckpointOptions = ...,
    load: LoadOptions = ...,
    engine: EngineOptions = ...,
    budget: BudgetSearchOptions = ...,
    guard: GuardOptions = ...,
    split: SplitOptions = ...,
) -> None:
    """Fine-tune MODEL on DATA with an adapter, sparse or full method; write the adapter/delta/model to OUTPUT.

    With --retain SOURCE:MIN, retention on SOURCE is checked while training and the best checkpoint within
    the budget is written (docs/adapt.md, "Training with a forgetting budget")."""
    from deltawise.adapt import TrainConfig, run_train
    from deltawise.io.gguf import resolve_gguf
    from deltawise.io.resolve import require_local_or_hub_id

    assert run.output is not None
    require_local_or_hub_id(str(model))
    cfg = TrainConfig(model=model, data=data, output=run.output, method=choice.method, task=resolve_task(data, data_options.task),
                      **asdict(training), **asdict(checkpoint), overwrite=run.overwrite, progress=not run.quiet,
                      method_params=method_params(choice), trust_remote_code=load.trust_remote_code,
                      allow_pickle=engine.allow_pickle)
    from deltawise.adapt.guarded import chosen_lines, guarded_train, request_from

    request = request_from(budget, guard, split)
    guarded = None
    with quiet_libraries(run.quiet), steps_progress(run.quiet) as progress:
        if request is None:
            result = run_train(cfg, model_path=resolve_gguf(model), progress=ProgressReporter(progress), note=note(run.quiet))
        else:
            guarded = guarded_train(cfg, request, model_path=resolve_gguf(model), note=note(run.quiet))
            result = guarded.train
    if not result.is_main_process:
        return  # torchrun / accelerate launch: rank 0 reports
    out.print(
        f"trained {result.method} ({result.trainable_params:,} of {result.total_params:,} parameters) for "
        f"{result.steps} steps in {result.seconds:.1f} s; wrote {escape(str(result.output))}", highlight=False,
    )
    for line in chosen_lines(guarded.record) if guarded else []:
        out.print(escape(line), highlight=False)


@options("engine", EngineOptions, only=("allow_pickle",),
         override={"allow_pickle": {"help": "accept a .bin/.pt base model (read with torch.load(weights_only=True))"}})
@options("executor", ExecutorOptions, override=BAM_EXECUTOR)
@options("load", LoadOptions)
@options("choice", MethodChoice, override={"method": {"default": "full"}, "rank": {"short": None}})
@options("training", TrainingOptions, override=BAM_TRAINING_DEFAULTS)
@options("data_options", DataOptions, only=("task",))
@options("run", RunOptions, exclude=("device",), override={
    "output": {"help": "final model folder (written atomically at the end, with bam.json)"},
    "overwrite": {"help": "replace a non-empty OUTPUT once the run succeeds"}})
@options("budget", BudgetSearchOptions, **GUARD_BUDGET)
@options("guard", GuardOptions, only=("interpolate", "interpolate_refine"))
@options("split", SplitOptions, override=GUARD_SPLIT)
def bam(
    model: Path = typer.Argument(..., help="base model: a Hugging Face folder or a .gguf file"),
    data: Path = typer.Option(..., "--data", help="training data (as for train); shuffled with --seed and cut into "
                                                  "branches x rounds disjoint slices"),
    run: RunOptions = ...,
    branches: int = typer.Option(2, "--branches", "-k", min=1, help="K: models trained from the same start per round"),
    rounds: int = typer.Option(1, "--rounds", min=1, help="R: branch-then-merge rounds"),
    rounds_old: Optional[int] = typer.Option(None, "-r", min=1, hidden=True, help="deprecated: --rounds"),
    merge_method: Optional[str] = typer.Option(None, "--merge", help="merge method (default: slerp t=0.5 for K=2, linear average "
                                                                     "for K>2); any name from `deltawise methods`"),
    merge_param: Optional[list[str]] = typer.Option(None, "--merge-param", help="merge parameter NAME=VALUE (repeatable), e.g. "
                                                                                "t=0.4 or lambda=0.8"),
    work: Optional[Path] = typer.Option(None, "--work", help="work folder for slices, branches and round merges (default: "
                                                             "OUTPUT.work beside OUTPUT)"),
    restart: bool = typer.Option(False, "--restart", help="discard a work folder left by a run with other options or data"),
    branch_index: Optional[int] = typer.Option(None, "--branch-index", help=(
        "train only branch K of the first unmerged round, then exit (one process per branch, for parallel runs)")),
    merge_only: bool = typer.Option(False, "--merge-only", help="train nothing: merge the rounds whose branches are finished "
                                                                "(after --branch-index runs); write OUTPUT once all are"),
    data_options: DataOptions = ...,
    training: TrainingOptions = ...,
    choice: MethodChoice = ...,
    load: LoadOptions = ...,
    engine: EngineOptions = ...,
    budget: BudgetSearchOptions = ...,
    guard: GuardOptions = ...,
    split: SplitOptions = ...,
    executor: ExecutorOptions = ...,
) -> None:
    """Branch-and-Merge: per round, train K branches from the current model on disjoint data slices and merge them.

    Each branch trains as `train` does (adapters are folded into the weights before merging); the
    LR schedule restarts in every branch, and branch i (1-based over all rounds) trains with seed + i - 1.
    Rerunning the same command continues an interrupted run: finished branches and rounds are skipped.
    With --retain SOURCE:MIN, every round's merged model is checked and the best round within the budget is written."""
    from deltawise.adapt import TrainConfig
    from deltawise.adapt.bam import BamConfig, run_bam
    from deltawise.errors import InputError
    from deltawise.io.gguf import resolve_gguf
    from deltawise.io.resolve import require_local_or_hub_id
    from deltawise.options import parse_assignments, scalar

    assert run.output is not None
    require_local_or_hub_id(str(model))
    if rounds_old is not None:
        if rounds != 1:
            raise InputError("--rounds and its old spelling -r are both given")
        warn("bam -r is deprecated; use --rounds")
        rounds = rounds_old
    train_cfg = TrainConfig(model=model, data=data, output=run.output, method=choice.method,
                            task=resolve_task(data, data_options.task), **asdict(training), overwrite=run.overwrite,
                            progress=False, method_params=method_params(choice), trust_remote_code=load.trust_remote_code,
                            allow_pickle=engine.allow_pickle)
    params = {k: scalar(v) for k, v in parse_assignments(merge_param, "--merge-param").items()}
    cfg = BamConfig(train=train_cfg, branches=branches, rounds=rounds, merge=merge_method, merge_params=params, work=work,
                    restart=restart, branch_index=branch_index, merge_only=merge_only, executor=executor.name,
                    jobs=executor.jobs, branch_cpus=executor.job_cpus, branch_gpus=executor.job_gpus,
                    branch_workers=executor.job_workers)
    from deltawise.adapt.guarded import chosen_lines, request_from

    request = request_from(budget, guard, split)
    record = None
    no_transformers_bars()
    with steps_progress(run.quiet) as progress:
        if request is None:
            result = run_bam(cfg, model_path=resolve_gguf(model), progress=ProgressReporter(progress), note=note(run.quiet))
        else:
            from deltawise.adapt.bam_guard import guarded_bam

            result, record = guarded_bam(cfg, request, model_path=resolve_gguf(model), progress=ProgressReporter(progress),
                                         note=note(run.quiet))
    if result.output is not None:
        out.print(f"BaM: {rounds} round(s) x {branches} branch(es) merged with {result.log['merge']['method']}; "
                  f"wrote {escape(str(result.output))} ({result.log['seconds']:.1f} s)", highlight=False)
    for line in chosen_lines(record) if record else []:
        out.print(escape(line), highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(bam)
