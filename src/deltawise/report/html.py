"""``deltawise report``: one self-contained HTML page (inline SVG and CSS, no scripts, no network)."""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape
from pathlib import Path

from deltawise.io.writer import write_text_atomic
from deltawise.report import figures, guard, tables
from deltawise.report.runs import BudgetSearch, Runs, load_runs
from deltawise.report.training import TRAINING_HEADER, training_rows

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: .9em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #777; font-style: italic; }
.summary { font-size: 1.05em; }
td[title] { text-decoration: underline dotted #aaa; cursor: help; }
"""


def figure(fig_id: str, svg: str | None, caption: str) -> str:
    """A figure with its caption; a note where there is no data for it (the report leaves such figures out)."""
    if svg is None:
        return f'<p class="note" id="{fig_id}-missing">No data for this figure in the given runs.</p>'
    return f'<figure id="{fig_id}" class="plot">{svg}<figcaption>{escape(caption)}</figcaption></figure>'


def shown(fig_id: str, svg: str | None, caption: str) -> str:
    """The figure, or nothing when the runs have no data for it."""
    return "" if svg is None else figure(fig_id, svg, caption)


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def render(runs: Runs, title: str = "deltawise audit report") -> str:
    """The page; a section whose results are absent from ``runs`` is left out, not printed empty."""
    counts = [plural(len(runs.evals), "evaluation"), plural(len(runs.budgets), "budget search"),
              plural(len(runs.weights), "weight analysis", "weight analyses"),
              plural(len(runs.interpolations), "interpolation curve"), plural(len(runs.trainings), "training run")]
    parts = [f"<h1>{escape(title)}</h1>",
             f"<p>Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from "
             f"{escape(', '.join(c for c in counts if not c.startswith('0 ')))}. Runs are named by their result files; "
             "hover a name for its path (all paths are listed under Sources).</p>"]
    if runs.trainings:
        parts += ["<h2>Training runs</h2>", tables.table("table-training", TRAINING_HEADER, training_rows(runs.trainings))]
    compared = [lab for lab, r in runs.evals if r.forgetting is not None]
    if compared or runs.budgets:
        parts += ["<h2>Forgetting</h2>",
                  shown("fig-tradeoff", figures.tradeoff(runs),
                         "Each run's source retention against its target gain, both relative to its baseline, with "
                         "paired bootstrap interval bars. Up and right is better; points below the dashed line at 1 forgot."
                         + (" Hollow points: a budget search's candidates, scored on its selection texts (the smallest "
                            "retention over its sources; the tick below each is the one-sided lower bound that must clear "
                            "the dotted budget line); a dashed arrow leads from the chosen point to the evaluation of "
                            "the merge it wrote." if runs.budgets else "")),
                  tables.forgetting_table(runs) if compared else ""]
    for lab, search in runs.budgets:
        parts += [f"<h2>Retention-budget search: {escape(lab)}</h2>", budget_summary(search),
                  shown(f"fig-budget-{tables.slug(lab)}", figures.budget_search(search),
                         "Retention (with its interval and one-sided lower bound) and target gain of each searched point, "
                         "scored on the selection split; the chosen point is the best target whose lower bound clears "
                         "the budget."),
                  tables.heldout_table(lab, search), tables.budget_table(lab, search)]
    if runs.evals:
        parts += ["<h2>Evaluations</h2>", tables.eval_table(runs)]
    if runs.weights:
        parts += ["<h2>Where each delta sits</h2>",
                  shown("fig-layers", figures.layer_profiles(runs.weights),
                         "Top: the Frobenius norm of each layer's delta relative to the layer's base weights. Bottom: "
                         "intruder dimensions (top singular vectors of a fine-tuned matrix with max |cos| < ε to every "
                         "base singular vector) summed over the layer's matrices. Embeddings, the LM head and the final "
                         "norm sit outside the layers and are in the totals below."),
                  tables.weights_table(runs)]
    if runs.interpolations:
        parts += ["<h2>Interpolation curves</h2>",
                  shown("fig-interpolation", figures.interpolation(runs.interpolations),
                         "Loss along θ_A + λ(θ_B − θ_A); the barrier is the largest rise above the straight chord "
                         "between the endpoints."),
                  tables.interpolation_table(runs)]
    parts += guard.section(runs.guarded)
    parts += ["<h2>Sources</h2>", tables.sources_table(runs)]
    if runs.skipped:
        parts.append('<p class="note">Skipped: ' + escape("; ".join(runs.skipped)) + "</p>")
    return page(title, [p for p in parts if p])


def budget_summary(search: BudgetSearch) -> str:
    """One sentence: what was chosen, on which split, and whether it held on the held-out one."""
    if search.chosen is None:
        return '<p class="note">No point was chosen.</p>'
    chosen = search.candidates[search.chosen]
    shown = tables.params_text(chosen.params)
    text = (f"{search.method}: {len(search.candidates)} points searched on the selection split; chosen {shown}"
            f"{'' if chosen.feasible else ' (the most retentive; no point met the budget)'}.")
    if search.heldout is not None:
        verdict = "meets" if search.heldout.within_budget else "does not meet"
        text += f" On the held-out split, which the search never saw, it {verdict} the budget."
    return f'<p class="summary">{escape(text)}</p>'


def page(title: str, parts: list[str]) -> str:
    """A self-contained HTML page of already-rendered parts (headings, tables, figures)."""
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def build_report(paths: list[Path], output: Path, title: str = "deltawise audit report") -> Runs:
    runs = load_runs(paths)
    write_text_atomic(output, render(runs, title))
    return runs
