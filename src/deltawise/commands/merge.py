"""``merge``, ``budget`` (retention-budget merging), ``verify`` and ``methods``."""

from __future__ import annotations

from pathlib import Path

import typer

from deltawise.commands.console import (
    ProgressReporter,
    bytes_progress,
    err,
    escape,
    no_transformers_bars,
    note,
    out,
    steps_progress,
    warn,
)
from deltawise.commands.flags import options
from deltawise.options import (ONE_PROCESS_JOBS, AdapterOutputOptions, BudgetSearchOptions, EngineOptions, ExecutorOptions,
                               IntervalOptions, LoadOptions, RunOptions, SplitOptions)

RECIPE = typer.Argument(..., help="merge recipe (YAML; mergekit recipes for shared methods work unchanged)")
MERGE_OUTPUT = {"output": {"help": "output folder (created; must not be an input)"}, "quiet": {"help": "no progress bars"},
                "overwrite": {"help": "replace a non-empty output folder once the merge succeeds"}}


@options("search", BudgetSearchOptions, hidden=True)  # deprecated: `deltawise budget`
@options("adapter", AdapterOutputOptions)
@options("engine", EngineOptions)
@options("run", RunOptions, positional=("output",), override=MERGE_OUTPUT)
def merge(
    recipe: Path = RECIPE,
    run: RunOptions = ...,
    engine: EngineOptions = ...,
    adapter: AdapterOutputOptions = ...,
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and inputs, print the plan, write nothing"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted merge of the same recipe and inputs"),
    restart: bool = typer.Option(False, "--restart", help="discard an interrupted merge and start over"),
    fsync: bool = typer.Option(False, "--fsync", help="flush each shard to disk before it counts as done (survives a power "
                                                      "loss; slower: waits for the disk)"),
    search: BudgetSearchOptions = ...,
    work_dir: Path = typer.Option(None, "--work-dir", help="multi-stage recipes: folder for the named stages' outputs "
                                                          "(default: OUTPUT.stages beside OUTPUT)"),
) -> None:
    """Merge models as described by RECIPE into OUTPUT.

    An interrupted merge (Ctrl-C, SIGTERM, a crash, a full disk) keeps its completed shards
    beside OUTPUT; rerun with --resume to merge only the rest. A file of several recipes (YAML
    documents, mergekit-multi's format) runs them all: named stages into --work-dir, finished
    ones not redone. To search the method's parameters under a retention budget first, use
    `deltawise budget` (docs/merging.md).

    With --output-format adapter (or an adapter: key in RECIPE) the merge of adapters of one base
    is written as a PEFT LoRA adapter: exact for linear/task arithmetic of LoRAs, else by SVD; changed
    embedding tables whole, or as LoRA-embedding factors with --adapter-embeddings lora."""
    from deltawise.io.writer import parse_size
    from deltawise.merge import MergeOptions, build_plan, load_recipe, run_merge
    from deltawise.errors import InputError
    from deltawise.merge.adapter_out import adapter_settings
    from deltawise.merge.engine import check_output, dump_plan, to_json

    assert run.output is not None
    if search.requested and not dry_run:
        if adapter.output_format == "adapter" or adapter.shapes_adapter:
            raise typer.BadParameter("the deprecated budget flags write a model; drop them for an adapter output")
        warn("merge --retain/--target/--search-param are deprecated; use `deltawise budget`")
        _run_budget(recipe, run, engine, search)
        return
    from deltawise.merge.multi import is_multi_stage

    if is_multi_stage(recipe):
        if adapter.output_format == "adapter":
            raise InputError("--output-format adapter is not supported for multi-stage recipes; "
                             "write the last stage as its own recipe with an adapter: key")
        _run_stages(recipe, run, engine, work_dir, dry_run, MergeOptions(
            device=run.device, threads=engine.threads, shard_size=parse_size(engine.shard_size), overwrite=run.overwrite,
            resume=resume, restart=restart, fsync=fsync))
        return
    parsed = load_recipe(recipe)
    settings = adapter_settings(parsed, adapter.output_format, adapter.adapter_rank, adapter.adapter_energy,
                                adapter.adapter_embeddings)
    plan = build_plan(parsed, allow_pickle=engine.allow_pickle, strict=engine.strict)
    for warning in plan.warnings:
        warn(warning)
    if settings is not None:
        if resume or restart:
            raise typer.BadParameter("--resume/--restart continue a model output; an adapter is written in one go")
        _merge_into_adapter(plan, settings, run, dry_run)
        return
    if dry_run:
        check_output(plan, run.output, run.overwrite)
        print(to_json(dump_plan(plan)))  # plain stdout: the plan must stay valid JSON
        return
    with bytes_progress(run.quiet) as progress:
        merge_options = MergeOptions(
            device=run.device, threads=engine.threads, shard_size=parse_size(engine.shard_size), overwrite=run.overwrite,
            resume=resume, restart=restart, fsync=fsync, progress=ProgressReporter(progress),
        )
        result = run_merge(plan, run.output, merge_options)
    gb = result.bytes_written / 1e9
    out.print(f"merged with {plan.method.name} into {escape(str(result.out))} ({gb:.3f} GB, {result.seconds:.1f} s)",
              highlight=False)


def _merge_into_adapter(plan, settings, run: RunOptions, dry_run: bool) -> None:
    """``merge --output-format adapter``: write a PEFT LoRA adapter and print how exact it is."""
    from deltawise.architecture import architecture_for
    from deltawise.merge.adapter_inputs import adapter_inputs
    from deltawise.merge.adapter_out import describe, run_adapter_merge, svd_tensors
    from deltawise.merge.engine import check_output, dump_plan, to_json

    assert run.output is not None
    if dry_run:
        inputs = adapter_inputs(plan)  # raises on inputs that cannot make one adapter
        check_output(plan, run.output, run.overwrite, need_bytes=0)
        by_svd = svd_tensors(plan, inputs, architecture_for(inputs.base.config), settings.lora_tables)
        print(to_json({**dump_plan(plan), "output_format": "adapter", "adapter": vars(settings), "svd_tensors": by_svd}))
        return
    with bytes_progress(run.quiet) as progress:
        result = run_adapter_merge(plan, run.output, settings, overwrite=run.overwrite, progress=ProgressReporter(progress))
    out.print(f"merged with {plan.method.name} into the PEFT adapter {escape(str(result.out))} ({result.seconds:.1f} s)",
              highlight=False)
    for line in describe(result):
        out.print(escape(line), highlight=False)


def _run_stages(recipe: Path, run: RunOptions, engine: EngineOptions, work_dir: Path | None, dry_run: bool,
                merge_options) -> None:
    """A multi-stage recipe (``deltawise.merge.multi``): every stage in dependency order."""
    from dataclasses import replace

    from deltawise.merge.engine import to_json
    from deltawise.merge.multi import load_stages, run_stages

    assert run.output is not None
    work = work_dir if work_dir is not None else run.output.parent / f"{run.output.name}.stages"
    if dry_run:
        stages = load_stages(recipe, work.resolve())
        print(to_json([{"stage": s.name or "final", "output": str(work / s.name if s.name else run.output),
                        "uses": s.needs, "recipe": s.data} for s in stages]))
        return

    def announce(stage, target: Path, done: bool) -> None:
        what = "verified, already merged" if done else "merging"
        out.print(f"stage {escape(stage.name or 'final')}: {what} -> {escape(str(target))}", highlight=False)

    with bytes_progress(run.quiet) as progress:
        options = replace(merge_options, progress=ProgressReporter(progress))
        results = run_stages(recipe, run.output, work, options, allow_pickle=engine.allow_pickle, strict=engine.strict,
                             on_stage=None if run.quiet else announce)
    out.print(f"merged {len(results)} stage(s) into {escape(str(run.output))} "
              f"({sum(r.skipped for r in results)} already done)", highlight=False)


@options("executor", ExecutorOptions, exclude=ONE_PROCESS_JOBS, override={
    "jobs": {"help": "local executor: candidates merged and scored at once, each in its own process (0: all of them)"}})
@options("intervals", IntervalOptions)
@options("split", SplitOptions)
@options("load", LoadOptions)
@options("search", BudgetSearchOptions)
@options("engine", EngineOptions, exclude=("strict",))  # budget builds its plans itself
@options("run", RunOptions, positional=("output",), override=MERGE_OUTPUT)
def budget(recipe: Path = RECIPE, run: RunOptions = ..., engine: EngineOptions = ..., search: BudgetSearchOptions = ...,
           split: SplitOptions = ..., intervals: IntervalOptions = ..., load: LoadOptions = ...,
           executor: ExecutorOptions = ...) -> None:
    """Retention-budget merging: search the recipe method's parameters for the best --target score
    that keeps each --retain SOURCE's retention >= MIN, and merge with the chosen point (docs/merging.md).

    Points are chosen on a selection split of the data and the chosen one is reported on a held-out split.
    Candidates are independent jobs (--executor, --jobs); each is kept in OUTPUT.budget-work until the search
    ends, so a rerun after a failure scores only the rest."""
    _run_budget(recipe, run, engine, search, load, intervals, split, executor)


def _run_budget(recipe: Path, run: RunOptions, engine: EngineOptions, search: BudgetSearchOptions,
                load: LoadOptions = LoadOptions(), intervals: IntervalOptions | None = None,
                split: SplitOptions | None = None, executor: ExecutorOptions | None = None) -> None:
    from deltawise.eval.runner import EvalOptions
    from deltawise.io.writer import parse_size
    from deltawise.merge import MergeOptions, load_recipe
    from deltawise.search.budget import BudgetOptions, RetentionBudget, run_budget

    assert run.output is not None
    output = run.output
    if search.report is not None:
        from deltawise.io.output import check_output_file

        check_output_file(search.report, [("recipe", recipe), *_recipe_inputs(recipe),
                                          *[("retain source", Path(r.rpartition(":")[0] or r)) for r in search.retain],
                                          *[("target", t) for t in search.target]], outputs=[output])
    no_transformers_bars()
    with steps_progress(run.quiet) as progress:
        budget_options = BudgetOptions(
            retain=[RetentionBudget.parse(r) for r in search.retain], targets=list(search.target),
            grid=_search_grid(search.search_param), refine=search.refine, most_retentive=search.most_retentive,
            baseline=search.baseline, allow_pickle=engine.allow_pickle, split=split or SplitOptions(),
            heldout_retain=list(search.heldout_retain),
            heldout_targets=list(search.heldout_target), intervals=intervals or IntervalOptions(),
            eval=EvalOptions(max_length=search.eval_max_length, batch_size=search.eval_batch_size, device=run.device,
                             trust_remote_code=load.trust_remote_code),
            merge=MergeOptions(device=run.device, threads=engine.threads, shard_size=parse_size(engine.shard_size),
                               overwrite=run.overwrite),
            executor=executor or ExecutorOptions(), note=None if run.quiet else note(False),
            progress=ProgressReporter(progress),
        )
        _budget_report(lambda: run_budget(load_recipe(recipe), output, budget_options), search.report, output)


def _recipe_inputs(recipe: Path) -> list[tuple[str, Path]]:
    """The model folders a recipe names, for the output checks; an unreadable recipe is reported by the merge itself."""
    from deltawise.errors import DeltawiseError
    from deltawise.merge import load_recipe

    try:
        parsed = load_recipe(recipe)
    except DeltawiseError:
        return []
    refs = [m.model for m in parsed.models] + ([parsed.base_model] if parsed.base_model else [])
    return [("model", Path(ref)) for ref in refs if isinstance(ref, str)]


def _search_grid(items: list[str]) -> dict[str, list]:
    from deltawise.options import parse_assignments, scalar

    return {k: [scalar(v.strip()) for v in text.split(",")] for k, text in parse_assignments(items, "--search-param").items()}


def _budget_report(search, report: Path | None, output: Path) -> None:
    """Run the budget search; print its table and write its JSON whether or not a point met the budget."""
    from deltawise.io.writer import write_json_atomic
    from deltawise.search.budget import BudgetNotMet, budget_table, heldout_lines

    try:
        result = search()
    except BudgetNotMet as exc:
        out.print(budget_table(exc.result))
        if report is not None:
            write_json_atomic(report, exc.result.to_json())
        raise
    out.print(budget_table(result))
    write_json_atomic(report or output / "deltawise_budget.json", result.to_json())
    chosen = result.candidates[result.chosen]
    chosen_text = ", ".join(f"{name} = {value}" for name, value in chosen.params.items())
    out.print(f"chose {escape(chosen_text)} on the selection split; wrote {escape(str(output))}", highlight=False)
    for line in heldout_lines(result):
        out.print(escape(line), highlight=False)


def verify(folder: Path = typer.Argument(..., help="model folder to check")) -> None:
    """Check a model folder: safetensors structure, the index, and each shard against its manifest."""
    from deltawise.io.verify import verify_folder

    report = verify_folder(folder)
    for name in report.checked:
        out.print(f"[green]ok[/]  {escape(name)}", highlight=False)
    for problem in report.problems:
        err.print(f"[bold red]bad[/] {escape(problem)}", highlight=False)
    scope = "shards, index and manifest checksums" if report.has_manifest else "safetensors structure and index (no manifest)"
    if not report.ok:
        err.print(f"{len(report.problems)} problem(s) in {escape(str(folder))}", highlight=False)
        raise typer.Exit(1)
    out.print(f"{escape(str(folder))}: verified ({scope})", highlight=False)


KINDS = ("all", "merge", "adapter")


def methods(kind: str = typer.Option("all", "--kind", help="which methods: all, merge (recipes) or adapter (train -m)")) -> None:
    """List the merge methods and the training (adapter) methods with their parameters."""
    from rich.table import Table

    if kind not in KINDS:
        raise typer.BadParameter(f"--kind must be one of {', '.join(KINDS)}")
    if kind in ("all", "merge"):
        from deltawise.merge import REGISTRY

        table = Table(title="merge methods", show_lines=True)
        table.add_column("method")
        table.add_column("what it does")
        table.add_column("parameters")
        for name in sorted(REGISTRY):
            cls = REGISTRY[name]
            table.add_row(name, cls.summary, "\n".join(p.describe() for p in cls.params) or "-")
        out.print(table)
    if kind in ("all", "adapter"):
        out.print(_adapter_table())


def _adapter_table():
    """Training methods (`train -m`, `bam -m`) and their parameters (`-p NAME=VALUE`)."""
    from rich.table import Table

    from deltawise.adapt.methods import REGISTRY as ADAPTERS  # importing the package registers every method

    table = Table(title="training methods (train/bam -m; parameters as -p NAME=VALUE)", show_lines=True)
    table.add_column("method")
    table.add_column("kind")
    table.add_column("what it does")
    table.add_column("parameters")
    for name in sorted(ADAPTERS):
        cls = ADAPTERS[name]
        described = "\n".join(p.describe(with_scope=False) for p in cls.params) or "-"
        table.add_row(name, cls.kind, cls.summary, described)
    return table


def register(app: typer.Typer) -> None:
    app.command()(merge)
    app.command()(budget)
    app.command()(verify)
    app.command()(methods)
