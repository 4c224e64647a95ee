"""``analyze weights`` and ``analyze interpolate``: weight-space analyses written as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deltawise.commands.console import escape, out, stage_factory, steps_progress, warn
from deltawise.commands.eval import WINDOW_DEFAULTS
from deltawise.commands.flags import options
from deltawise.errors import InputError
from deltawise.options import DataOptions, LoadOptions, RunOptions

analyze_app = typer.Typer(help="Weight-space analyses: delta norms, intruder dimensions, sign conflicts, masks, interpolation "
                               "curves.",
                          no_args_is_help=True)
TALL_LAMBDA_DEFAULT = 0.4


@options("run", RunOptions, only=("output", "quiet"), override={"output": {"help": "analysis JSON to write"},
                                                                "quiet": {"help": "no progress bars"}})
def weights(
    base: str = typer.Argument(..., help="base (pre-trained) model folder"),
    models: list[str] = typer.Argument(..., help="fine-tuned models, or delta or PEFT adapter folders (two or more add sign "
                                                 "conflicts and mask overlaps)"),
    run: RunOptions = ...,
    delta_base: Optional[str] = typer.Option(None, "--base", help="the base of a delta or adapter folder given as a model "
                                                                  "(default: the base it records)"),
    k: int = typer.Option(10, min=1, help="top singular vectors of each fine-tuned matrix searched for intruders"),
    eps: float = typer.Option(0.5, min=0.0, max=1.0, help="intruder threshold on max |cos| with the base's singular vectors"),
    side: str = typer.Option("left", help="singular vectors compared: left (U) or right (V)"),
    lam: float = typer.Option(TALL_LAMBDA_DEFAULT, "--lam", min=0.0,
                              help="TALL mask threshold lambda (one value for every task)"),
    tall_lambda: Optional[float] = typer.Option(None, "--tall-lambda", min=0.0, hidden=True, help="deprecated: --lam"),
    no_intruders: bool = typer.Option(False, "--no-intruders", help="skip the SVDs (norms, conflicts and masks only)"),
) -> None:
    """Per-tensor delta norms, spectra and intruder dimensions, sign conflicts and TALL mask overlaps, streamed."""
    from deltawise.analyze.weights import WeightsOptions, analyze_weights
    from deltawise.io.output import check_output_file

    assert run.output is not None
    check_output_file(run.output, [("base", Path(base)), *[("model", Path(m)) for m in models],
                                   ("delta base", Path(delta_base) if delta_base else None)])
    if side not in ("left", "right"):
        raise typer.BadParameter("--side must be left or right")
    if tall_lambda is not None:
        if lam != TALL_LAMBDA_DEFAULT:
            raise InputError("--lam and its old spelling --tall-lambda are both given")
        warn("--tall-lambda is deprecated; use --lam")
        lam = tall_lambda
    with steps_progress(run.quiet) as progress:
        opts = WeightsOptions(k=k, eps=eps, side=side, tall_lambda=lam, intruders=not no_intruders,  # type: ignore[arg-type]
                              progress=stage_factory(progress)("tensors"), delta_base=delta_base)
        result = analyze_weights(base, models, opts)
    result.save(run.output)
    for message in result.settings.get("warnings") or []:
        warn(str(message))
    for m in result.summary.models:
        out.print(f"{escape(m.model)}: |delta| = {m.delta_norm:.4g} (relative {m.relative or 0:.3g}), "
                  f"{m.intruders} intruder dimension(s) in {m.matrices} matrices", highlight=False)
    if result.summary.sign_conflict_rate is not None:
        summary = result.summary
        out.print(f"sign conflicts: {summary.sign_conflict_rate:.3%} of entries; selfish {summary.selfish_rate:.3%}, "
                  f"catastrophic {summary.catastrophic_rate:.3%}", highlight=False)
    out.print(f"wrote {escape(str(run.output))}", highlight=False)


@options("load", LoadOptions)
@options("data_options", DataOptions, only=("max_length", "batch_size"), override=WINDOW_DEFAULTS)
@options("run", RunOptions, exclude=("overwrite",), override={
    "output": {"help": "curve JSON to write"}, "quiet": {"help": "no progress bars"}, "device": {"help": "cpu or cuda"}})
def interpolate(
    model_a: str = typer.Argument(..., help="first model (lambda = 0); a model, or a delta or PEFT adapter folder"),
    model_b: str = typer.Argument(..., help="second model (lambda = 1); a model, or a delta or PEFT adapter folder"),
    base_model: Optional[str] = typer.Option(None, "--base", help="the base of a delta or adapter given as A or B "
                                                                  "(default: the base it records)"),
    data: Path = typer.Option(..., "--data", help="text data to measure loss on"),
    run: RunOptions = ...,
    points: int = typer.Option(11, min=2, help="number of lambdas in linspace(0, 1, points)"),
    data_options: DataOptions = ...,
    load: LoadOptions = ...,
) -> None:
    """Loss and perplexity along the straight line between two models, and the loss barrier."""
    from deltawise.analyze.interpolate import InterpolationOptions, interpolation_curve
    from deltawise.io.output import check_output_file

    assert run.output is not None
    check_output_file(run.output, [("model A", Path(model_a)), ("model B", Path(model_b)), ("data", data),
                                   ("base", Path(base_model) if base_model else None)])
    with steps_progress(run.quiet) as progress:
        opts = InterpolationOptions(points=points, max_length=data_options.max_length, batch_size=data_options.batch_size,
                                    device=run.device, progress=stage_factory(progress)("interpolation points"),
                                    trust_remote_code=load.trust_remote_code, base=base_model)
        result = interpolation_curve(model_a, model_b, data, opts)
    result.save(run.output)
    out.print(curve_table(result))
    out.print(f"loss barrier {result.barrier:.4g} nats/token at lambda = {result.barrier_lambda:.2f}; "
              f"wrote {escape(str(run.output))}", highlight=False)


def curve_table(result):
    """The interpolation curve as a table (lambda, loss, perplexity), so the barrier can be read against it."""
    from rich.table import Table

    table = Table(title=f"loss from {escape(result.model_a.name)} (lambda = 0) to {escape(result.model_b.name)} (lambda = 1)")
    for column in ("lambda", "loss (nats/token)", "perplexity"):
        table.add_column(column, justify="right")
    for lam, loss, ppl in zip(result.lambdas, result.loss, result.perplexity):
        table.add_row(f"{lam:.2f}", f"{loss:.4f}", f"{ppl:.4g}")
    return table


analyze_app.command("weights")(weights)
analyze_app.command("interpolate")(interpolate)


def register(app: typer.Typer) -> None:
    app.add_typer(analyze_app, name="analyze")
