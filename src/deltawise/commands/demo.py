"""``demo``: the whole loop on SmolLM2-135M, German fortunes and English text."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deltawise.commands.console import out


def demo(
    workdir: Optional[Path] = typer.Option(None, help="run folder for data, models, result JSONs and the report (default: a "
                                                      "temporary folder)"),
    steps: int = typer.Option(15, min=1, help="training steps per method (batch 8 x 64 tokens)"),
    quick: bool = typer.Option(False, "--quick", help="4 steps and 10 eval texts per set: a smoke run"),
) -> None:
    """Adapt SmolLM2-135M to German with LoRA and HFT, merge them with a retention budget on English, print the forgetting table and write the HTML report."""  # noqa: E501  (typer shows the first line only)
    from deltawise.demo import run_demo

    run_demo(workdir, out, steps=steps, quick=quick)


def register(app: typer.Typer) -> None:
    app.command()(demo)
