"""``deltawise report``: one self-contained HTML page (inline SVG and CSS, no scripts, no network)."""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape
from pathlib import Path

from deltawise.io.writer import write_text_atomic
from deltawise.report import figures, guard, tables
from deltawise.report.runs import Runs, load_runs
from deltawise.report.training import TRAINING_HEADER, training_rows

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: .9em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.note { color: #777; font-style: italic; }
"""


def figure(fig_id: str, svg: str | None, caption: str) -> str:
    if svg is None:
        return f'<p class="note" id="{fig_id}-missing">No data for this figure in the given runs.</p>'
    return f'<figure id="{fig_id}" class="plot">{svg}<figcaption>{escape(caption)}</figcaption></figure>'


def render(runs: Runs, title: str = "deltawise audit report") -> str:
    parts = [f"<h1>{escape(title)}</h1>",
             f"<p>Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from "
             f"{len(runs.evals)} evaluation(s), {len(runs.weights)} weight analysis(es), "
             f"{len(runs.interpolations)} interpolation curve(s)"
             + (f", {len(runs.trainings)} training run(s)" if runs.trainings else "") + ".</p>"]
    if runs.trainings:
        parts += ["<h2>Training runs</h2>", tables.table("table-training", TRAINING_HEADER, training_rows(runs.trainings))]
    parts += ["<h2>Forgetting</h2>",
              figure("fig-tradeoff", figures.tradeoff(runs.evals),
                     "Each run's source retention against its target gain, both relative to its baseline. "
                     "Up and right is better; "
                     "points below the dashed line forgot."),
              tables.forgetting_table(runs.evals), "<h2>Evaluations</h2>", tables.eval_table(runs.evals)]
    parts += ["<h2>Interpolation curves</h2>",
              figure("fig-interpolation", figures.interpolation(runs.interpolations),
                     "Loss along θ_A + λ(θ_B − θ_A); the barrier is the largest rise above the straight chord "
                     "between the endpoints."),
              tables.interpolation_table(runs.interpolations)]
    parts += ["<h2>Weight deltas</h2>",
              figure("fig-layer-deltas", figures.layer_deltas(runs.weights),
                     "Frobenius norm of each tensor's delta relative to the base tensor."),
              figure("fig-intruders", figures.intruder_counts(runs.weights),
                     "Top-k singular vectors of fine-tuned matrices with max |cos| < ε to every base singular vector."),
              tables.weights_table(runs.weights)]
    parts += guard.section(runs.guarded)
    if runs.skipped:
        parts.append('<p class="note">Skipped: ' + escape("; ".join(runs.skipped)) + "</p>")
    return page(title, parts)


def page(title: str, parts: list[str]) -> str:
    """A self-contained HTML page of already-rendered parts (headings, tables, figures)."""
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def build_report(paths: list[Path], output: Path, title: str = "deltawise audit report") -> Runs:
    runs = load_runs(paths)
    write_text_atomic(output, render(runs, title))
    return runs
