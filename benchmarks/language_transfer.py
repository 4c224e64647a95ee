"""Language transfer: SmolLM2-135M adapted English → German and English → Bulgarian, gain vs forgetting.

    .venv/bin/python benchmarks/language_transfer.py [--languages de,bg] [--methods full,lora,...] [--steps 40]

Every method gets the same training budget (steps × batch × sequence length of target-language
fortunes, from the Debian ``fortunes-de`` / ``fortunes-bg`` packages, installed when absent) and is
scored on three held-out sets:

* target: held-out fortunes of the target language (perplexity; lower is better);
* source: English *prose* paragraphs -- the licence texts every Debian has and Python
  standard-library docstrings. They share neither the language nor the fortunes' short, quippy
  format, so a model cannot look better on them by having learnt the training format: a rise in
  their perplexity is lost English ability (forgetting), which is what this benchmark must see;
* format control: held-out *English fortunes*. They share the format but not the language; they
  show how format learning hides forgetting (their perplexity often falls while prose rises).

Full fine-tuning also runs at a quarter and a half of the budget, giving a gain-vs-forgetting curve
that the other methods (and BaM, when ``deltawise bam`` exists) are compared against: "less forgetting
at equal target gain" means lying above that curve.

Prints a table per language, writes ``language_transfer.json``, every evaluation JSON and an HTML
report (the standard ``deltawise report`` page: trade-off figure and forgetting table) into the work
folder. Trained adapters and evaluations are cached there: a rerun only does what is missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table

# real data helpers (fortunes, English prose, models shipped in wheels) live beside the demo in examples/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import realtext  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)


@dataclass(frozen=True)
class Run:
    label: str
    method: str
    lr: float
    budget: float = 1.0  # fraction of the step budget


# Learning rates: the usual ones for each family at this model size (adapters train few
# parameters and take ~10x full fine-tuning's rate; PiSSA starts from the principal
# components and takes a full-FT-like rate, as its paper advises).
RUNS = [
    Run("full", "full", 1e-4),
    Run("full-half", "full", 1e-4, 0.5),
    Run("full-quarter", "full", 1e-4, 0.25),
    Run("lora", "lora", 2e-3),
    Run("dora", "dora", 2e-3),
    Run("pissa", "pissa", 2e-4),
    Run("loldu", "loldu", 1e-2),
    Run("fourierft", "fourierft", 5e-2),
    Run("lift", "lift", 2e-4),
    Run("hft", "hft", 1e-4),
    Run("bam", "bam", 1e-4),
    # The same budget at ten times the usual rate: the regime where English is forgotten.
    Run("full-lr1e-3", "full", 1e-3),
    Run("lora-lr2e-2", "lora", 2e-2),
    Run("hft-lr1e-3", "hft", 1e-3),
    Run("bam-lr1e-3", "bam", 1e-3),
]
LANGUAGES = {"de": ("German", "fortunes-de"), "bg": ("Bulgarian", "fortunes-bg")}
CONTROL = ["people", "wisdom", "work", "men-women", "politics"]  # English fortune files (format control)


def prepare(work: Path, lang: str, n_eval: int, seed: int) -> dict[str, Path]:
    # One folder per language, the English sets included: they are drawn after the language's
    # own shuffle, so each language has its own 48 paragraphs, and preparing one language must
    # never rewrite the sets another language's cached results were measured on.
    data = work / "data" / lang
    data.mkdir(parents=True, exist_ok=True)
    paths = {"target": data / f"{lang}_heldout.jsonl", "train": data / f"{lang}_train.txt",
             "source": data / "english_prose.jsonl", "control": data / "english_fortunes.jsonl"}
    if all(p.is_file() for p in paths.values()):
        return paths
    realtext.ensure_fortunes(["fortunes", LANGUAGES[lang][1]], say=lambda m: console.print(f"  {m}"))
    rng = random.Random(seed)
    target = realtext.fortunes(realtext.FORTUNES / lang, min_chars=40, max_chars=400)
    rng.shuffle(target)
    prose = realtext.english_prose()
    rng.shuffle(prose)
    control = [t for f in CONTROL for t in realtext.fortunes(realtext.FORTUNES / f, min_chars=40, max_chars=400)]
    rng.shuffle(control)
    write_jsonl(paths["target"], target[:n_eval])
    paths["train"].write_text("\n%\n".join(target[n_eval:]) + "\n", encoding="utf-8")
    write_jsonl(paths["source"], prose[:n_eval])
    write_jsonl(paths["control"], control[:n_eval])
    return paths


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


def evaluate(model: Path, label: str, paths: dict[str, Path], out: Path, baseline=None):
    """Target and English prose (the source) in one result; the format control in a second file beside it
    (kept out of the forgetting score, which must reflect lost English ability only)."""
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.results import load_result
    from deltawise.eval.runner import EvalOptions, evaluate as run_eval

    control = out.with_suffix(".control.json")
    measured_on = {str(f.resolve()) for f in (paths["source"], paths["target"])}
    if out.is_file() and {str(Path(d.path).resolve()) for d in load_result(out).datasets} != measured_on:
        out.unlink()  # measured on other files (an older data layout): measure again
        control.unlink(missing_ok=True)
    if not out.is_file():
        options = EvalOptions(max_length=256, batch_size=16)
        result = run_eval(str(model), [paths["source"]], [paths["target"]], options)
        result.model = label
        if baseline is not None:
            result.forgetting = forgetting(result, baseline)
        run_eval(str(model), [paths["control"]], [], options).save(control)
        result.save(out)
    return load_result(out), load_result(control).datasets[0].value


def train(run: Run, base: Path, paths: dict[str, Path], out: Path, args) -> dict:
    """Train ``run`` into ``out`` (an adapter or delta folder) unless already there; returns its log."""
    from deltawise.adapt.train import TrainConfig, run_train

    log_file = out / "deltawise_train.json"
    if not log_file.is_file():
        steps = max(1, round(args.steps * run.budget))
        cfg = TrainConfig(model=base, data=paths["train"], output=out, method=run.method, max_steps=steps, lr=run.lr,
                          batch_size=args.batch_size, max_length=args.max_length, warmup=0.1, schedule="cosine",
                          logging_steps=max(1, steps // 5), overwrite=True, progress=console.is_terminal, seed=args.seed)
        run_train(cfg)
    return json.loads(log_file.read_text())


def bam(base: Path, paths: dict[str, Path], out: Path, run: Run, args) -> dict:
    """Branch-and-Merge with the same total budget: 2 branches × 2 rounds, each branch a quarter of the steps."""
    log = out / "bam.json"
    if not log.is_file():
        out.mkdir(parents=True, exist_ok=True)
        steps = max(1, args.steps // 4)
        cmd = [sys.executable, "-m", "deltawise", "bam", str(base), "--data", str(paths["train"]), "--branches", "2",
               "--rounds", "2", "--merge", "slerp", "--method", "full", "--lr", str(run.lr), "--max-steps", str(steps),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--seed", str(args.seed),
               "--schedule", "cosine", "--warmup", "0.1", "--quiet",
               "-o", str(out / "model"), "--work", str(out / "work")]
        proc = subprocess.run(cmd, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"deltawise bam failed ({proc.returncode})")
        shutil.copy(out / "model" / "bam.json", log) if (out / "model" / "bam.json").is_file() else log.write_text("{}")
    return json.loads(log.read_text())


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-work/language_transfer"))
    ap.add_argument("--languages", default="de,bg")
    ap.add_argument("--methods", default="all", help="comma-separated run labels (" + ",".join(r.label for r in RUNS) + ")")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps of the full budget")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-items", type=int, default=80, help="items per evaluation set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from deltawise.adapt.materialize import materialize
    from demo import fetch_smollm2
    from deltawise.report.html import build_report

    started = time.time()
    by_label = {r.label: r for r in RUNS}
    unknown = [m for m in args.methods.split(",") if m not in by_label] if args.methods != "all" else []
    if unknown:
        raise SystemExit(f"unknown runs: {', '.join(unknown)} (have {', '.join(by_label)})")
    runs = RUNS if args.methods == "all" else [by_label[m] for m in args.methods.split(",")]  # in the order given
    base = fetch_smollm2(console)
    payload: dict = {"benchmark": "language_transfer", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                     "host": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads",
                     "settings": {k: v for k, v in vars(args).items() if k != "work"} | {"work": str(args.work)},
                     "runs": [asdict(r) for r in runs], "languages": {}}
    eval_files: list[Path] = []
    for lang in args.languages.split(","):
        if lang not in LANGUAGES:
            raise SystemExit(f"unknown language {lang!r} (have {', '.join(LANGUAGES)})")
        work = args.work / lang
        console.print(f"[bold]English → {LANGUAGES[lang][0]}[/] "
                      f"({args.steps} steps × {args.batch_size} × {args.max_length} tokens)")
        paths = prepare(args.work, lang, args.eval_items, args.seed)
        (work / "results").mkdir(parents=True, exist_ok=True)
        base_eval, base_control = evaluate(base, "base", paths, work / "results" / "base.json")
        eval_files.append(work / "results" / "base.json")
        rows = {}
        for run in runs:
            t0 = time.time()
            result_file = work / "results" / f"{run.label}.json"
            if run.method == "bam":
                log = bam(base, paths, work / run.label, run, args)
                model = work / run.label / "model"
            else:
                adapter = work / "adapters" / run.label
                log = train(run, base, paths, adapter, args)
                model = work / "models" / run.label
                if not result_file.is_file():  # the adapter folded into the base (full fine-tuning: itself)
                    model.parent.mkdir(parents=True, exist_ok=True)
                    model = materialize(adapter, base, model)
            res, control_ppl = evaluate(model, f"{lang}:{run.label}", paths, result_file, base_eval)
            if model.parent.name == "models":
                shutil.rmtree(model, ignore_errors=True)  # 0.5 GB each; the adapter stays
            eval_files.append(result_file)
            ppl = {d.name: d.value for d in res.datasets} | {paths["control"].stem: control_ppl}
            f = res.forgetting
            rows[run.label] = {"train": _train_summary(work / "adapters" / run.label, log), "ppl": ppl,
                               "target_gain": f.target_gain,
                               "source_retention": f.source_retention, "forgetting_score": f.forgetting_score,
                               "datasets": [d.model_dump() for d in f.datasets]}
            console.print(f"  {run.label:<10} target ppl {ppl[paths['target'].stem]:.1f}  "
                          f"prose ppl {ppl[paths['source'].stem]:.1f}  "
                          f"retention {f.source_retention:.3f}  ({time.time() - t0:.0f} s)")
        base_ppl = {d.name: d.value for d in base_eval.datasets} | {paths["control"].stem: base_control}
        payload["languages"][lang] = {"base": base_ppl, "runs": rows}
        print_table(lang, paths, base_ppl, rows)
    args.work.mkdir(parents=True, exist_ok=True)
    payload["seconds"] = time.time() - started
    (args.work / "language_transfer.json").write_text(json.dumps(payload, indent=2))
    report = args.work / "language_transfer.html"
    build_report(eval_files, report, title="deltawise language transfer: SmolLM2-135M")
    console.print(f"JSON: {args.work / 'language_transfer.json'}\nreport: {report}\ndone in {time.time() - started:.0f} s")


def _train_summary(folder: Path, meta: dict) -> dict:
    summary = {k: meta.get(k) for k in ("trainable_params", "steps", "seconds")}
    log = folder / "training_log.json"
    records = json.loads(log.read_text()) if log.is_file() else []
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    rss = [r["peak_rss_mb"] for r in records if r.get("peak_rss_mb")]
    summary["tokens_per_s"] = sum(speeds) / len(speeds) if speeds else None
    summary["peak_rss_mb"] = max(rss) if rss else None
    return summary


def print_table(lang: str, paths: dict[str, Path], base: dict[str, float], rows: dict[str, dict]) -> None:
    t, s, c = paths["target"].stem, paths["source"].stem, paths["control"].stem
    table = Table(title=f"SmolLM2-135M, English → {LANGUAGES[lang][0]}: target gain vs English retention")
    for col in ("method", "trainable", "target ppl", "English prose ppl", "English fortunes ppl", "target gain",
                "prose retention", "forgetting"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    table.add_row("base", "", f"{base[t]:.1f}", f"{base[s]:.1f}", f"{base[c]:.1f}", "", "1.000", "")
    for label, r in rows.items():
        n = r["train"].get("trainable_params")
        table.add_row(label, f"{n:,}" if n else "", f"{r['ppl'][t]:.1f}", f"{r['ppl'][s]:.1f}", f"{r['ppl'][c]:.1f}",
                      f"{r['target_gain']:+.2f}", f"{r['source_retention']:.3f}", f"{r['forgetting_score']:.2f}")
    console.print(table)
    console.print("[dim]target gain = base ppl / model ppl − 1 on held-out target fortunes; retention = the same ratio on "
                  "English prose (1 = nothing forgotten); forgetting = 100 × max(0, 1 − retention); English fortunes "
                  "share the training format and are shown, not scored[/]")


if __name__ == "__main__":
    main()
