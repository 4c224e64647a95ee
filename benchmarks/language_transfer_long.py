"""Language transfer in the forgetting regime: SmolLM2-135M English -> German for hundreds of steps.

    .venv/bin/python benchmarks/language_transfer_long.py --pilot            # 1. how many steps forget English?
    .venv/bin/python benchmarks/language_transfer_long.py --plan             # 2. the runs, and which are done
    .venv/bin/python benchmarks/language_transfer_long.py [--methods full,lora] [--seeds 0,1,2]   # 3. run (in parts)

Data (seeded, written once under WORK/data; benchmarks/README.md has the counts):
* target: German fortunes (Debian ``fortunes-de``): 300 evaluation items, 150 selection items, the rest
  (~16.7k) for training;
* source, perplexity: English prose paragraphs (licence texts, Python docstrings; examples/realtext.py):
  300 evaluation, 150 selection;
* source, not perplexity: WordNet gloss -> lemma multiple choice (benchmarks/wordnet_mc.py), 400
  items, accuracy through ``eval``'s choice format (byte-normalised log-likelihood);
* English training text (replay): the Python language reference (``pydoc_data``) and the prose paragraphs left
  over, none of them in an evaluation or selection set; the English-only control's: English Debian fortunes
  (``fortunes``, ``fortunes-min``; lt_methods.english_fortunes).

The pilot trains full fine-tuning at its usual rate (1e-4) for ``--pilot-steps``, saves a checkpoint
every ``--pilot-every`` steps, evaluates each and prints the curve with paired bootstrap intervals.
When the final checkpoint's prose-retention interval lies below 1, English is measurably forgotten by a
completed schedule and the pilot's length becomes the main runs' ``--steps`` (lt_report.main_steps: an
earlier checkpoint is not what a run of that length ends with, since its cosine decay comes sooner).

Main runs (lt_methods.py has the table): every method over a small learning-rate sweep (seeds
``--seeds`` at its usual rate, ``--sweep-seeds`` elsewhere), each run at the usual rate followed by a
retention-budget merge with the base (``task_arithmetic``, lambda searched; selected on the
selection sets, reported on the evaluation sets). Methods are compared at matched target gain
(lt_fronts.py). The forgetting-budget rows (lt_budget.py: guarded training, repair, the learning-rate
search) are compared with full and LoRA at their own target gain, with their total cost. Every training
run, evaluation and search is cached under WORK/runs/KEY and skipped when present, so the benchmark can be
run in parts and on several machines sharing WORK.

Records (lt_records.py): what a finished stage cost hours to compute -- each run's evaluation (with its per-item
scores), budget merge, seconds and tool record, each pilot checkpoint's evaluation, the pilot's result and the
base's evaluation -- is also kept in benchmarks/records/language_transfer_long/ (one file per run key, ``pilot``
and ``base``; commit them), with the settings it was computed with (the base, a sha256 of the seeded sets, steps,
training, method and stage options, scoring). A new machine with an empty WORK takes every recorded stage from
there: a recorded run is neither trained nor evaluated (``--plan`` says "recorded"), the main runs take
``--steps`` from the recorded pilot, a rerun pilot evaluates only the checkpoints not recorded. A record made with
other settings -- sets drawn from other Debian/Python files among them -- is neither used nor overwritten, and a
run folder in WORK computed with other settings is refused. ``--no-record`` keeps results in WORK only, as does
``--base DIR``, which runs the benchmark on another model (tests use a tiny one).

On a GPU (``--device cuda``, or ``auto`` where there is one) the results are recorded apart, in
records/language_transfer_long/cuda/: a GPU rounds differently, so its seed-0 run is not the CPU's seed-0 run, and
the two are never mixed in one table (the recorded CPU pilot does not serve either: give ``--steps``). Several
processes may share one WORK, each with its own ``--methods``/``--seeds`` (a GPU runs eight at once well;
``--checkpoints 0`` spares the disk their resumable checkpoints). On a machine without a GPU, ``--device cuda`` with
recorded runs reprints the GPU's tables from their records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import lt_budget  # noqa: E402
import lt_fronts  # noqa: E402
import lt_methods  # noqa: E402
import lt_records  # noqa: E402
from bench_args import rate_list, seed_list_or_none  # noqa: E402
import lt_report  # noqa: E402
from language_transfer import console  # noqa: E402
from lt_methods import FULL, Data, Run, eval_options, prepare_data  # noqa: E402
from lt_records import Book  # noqa: E402
from records import add_record_argument  # noqa: E402

SMOLLM2 = "SmolLM2-135M-Instruct (examples/demo.py)"  # the default base, as base.txt and the records name it


def resolve_device(name: str) -> str:
    """``auto``: the GPU when there is one. ``cpu`` hides the GPUs before CUDA starts, so training
    (transformers picks the accelerator itself) stays on the CPU too."""
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def machine(device: str) -> str:
    import torch

    gpu = ""
    if device.startswith("cuda"):
        gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU here (results from records)"
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads{gpu}"


def evaluate(model: Path, label: str, data: Data, out: Path, baseline, args):
    """Prose and WordNet (sources) and German (target) in one result, compared with ``baseline``."""
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.results import load_result
    from deltawise.eval.runner import evaluate as run_eval

    if not out.is_file():
        lt_methods.require_compute(args)
        result = run_eval(str(model), [data.prose_eval, data.mc], [data.german_eval], eval_options(args))
        result.model = label
        if baseline is not None:
            result.forgetting = forgetting(result, baseline)
        out.parent.mkdir(parents=True, exist_ok=True)
        result.save(out)
    return load_result(out)


def checkpoint_callback(folder: Path, every: int, base: Path, skip: set[int]):
    """Saves the model every ``every`` steps (a transformers TrainerCallback), atomically."""
    from transformers import AutoTokenizer, TrainerCallback

    tokenizer = AutoTokenizer.from_pretrained(base)

    class SaveEvery(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            out = folder / f"step-{step:05d}"
            if step % every or step in skip or out.is_dir():
                return
            staging = folder / f".{out.name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            staging.rename(out)

    return SaveEvery()


def pilot_steps(args) -> list[int]:
    return list(range(args.pilot_every, args.pilot_steps + 1, args.pilot_every))


def step_result(step: int) -> str:
    """A pilot checkpoint's evaluation, in WORK/pilot."""
    return f"results/step-{step:05d}.json"


def pilot_unit(args, book: Book) -> lt_records.Unit:
    names = tuple(step_result(s) for s in pilot_steps(args))
    return book.unit("pilot", args.work / "pilot", lt_records.pilot_settings(args), (*names, "pilot.json"))


def base_evaluation(base: Path, data: Data, args, book: Book):
    """The base's evaluation (WORK/base.json; recorded as ``base``), which every other one is compared with."""
    unit = book.unit("base", args.work, {}, ("base.json",))
    book.restore(unit)
    result = evaluate(base, "base", data, args.work / "base.json", None, args)
    book.keep(unit)
    return result


def pilot(base: Path, data: Data, args, book: Book) -> dict:
    """Full fine-tuning at 1e-4 with a checkpoint every ``--pilot-every`` steps, each evaluated. An interrupted pilot
    continues from its last training checkpoint when rerun; a recorded checkpoint's evaluation is not repeated (but
    the pilot trains again when another is missing: the checkpoints live in the work folder only)."""
    from deltawise.adapt.checkpoints import interrupted_checkpoint
    from deltawise.adapt.train import TrainConfig, run_train

    unit = pilot_unit(args, book)
    book.claim(unit)
    book.restore(unit)
    folder, steps = unit.folder, pilot_steps(args)
    done = {s for s in steps if (folder / step_result(s)).is_file()}
    train_s = None
    if set(steps) - done and not (folder / "train" / "deltawise_train.json").is_file():
        lt_methods.require_compute(args)
        run = Run(FULL, args.pilot_lr, lt_records.pilot_seed(args))
        cfg = TrainConfig(**lt_methods.settings(run, base, data, args), output=folder / "train", method="full",
                          max_steps=args.pilot_steps, logging_steps=args.pilot_every, save_every=args.pilot_every,
                          resume=interrupted_checkpoint(folder / "train") is not None)
        t0 = time.time()
        run_train(cfg, callbacks=[checkpoint_callback(folder / "checkpoints", args.pilot_every, base, done)])
        train_s = time.time() - t0
    base_eval = base_evaluation(base, data, args, book)
    curve = []
    for step in steps:
        ckpt = folder / "checkpoints" / f"step-{step:05d}"
        out = folder / step_result(step)
        if not out.is_file() and not ckpt.is_dir():
            raise SystemExit(f"{ckpt} is missing and {out} was never written: delete {folder / 'train'} and rerun --pilot")
        res = evaluate(ckpt, f"full@{step}", data, out, base_eval, args)
        shutil.rmtree(ckpt, ignore_errors=True)  # 0.5 GB each; the evaluation stays
        book.keep(unit)
        curve.append({"step": step, **lt_report.measures(res, data)})
    forgets_at = next((p["step"] for p in curve if lt_report.forgets(p)), None)  # informative; the runs: main_steps
    pilot_file = folder / "pilot.json"
    if train_s is None and pilot_file.is_file():  # nothing trained now: the seconds of the training that was
        train_s = json.loads(pilot_file.read_text())["train_seconds"]
    record = {"lr": args.pilot_lr, "steps": args.pilot_steps, "every": args.pilot_every, "train_seconds": train_s,
              "curve": curve, "forgets_at": forgets_at,
              "rule": "forgets_at: the first checkpoint whose 95% paired bootstrap interval of prose retention lies below 1; "
                      "the main runs train the pilot's length when its final checkpoint forgets"}
    pilot_file.write_text(json.dumps(record, indent=2))
    book.keep(unit)
    return record


def run_unit(run: Run, args, book: Book) -> lt_records.Unit:
    return book.unit(run.key, args.work / "runs" / run.key, lt_records.run_settings(run, args), lt_records.RUN_FILES)


def run_one(run: Run, base: Path, data: Data, base_eval, args, book: Book, merge: bool = True,
            need_model: bool = False) -> dict:
    """Train, evaluate and (at the usual rate, unless not ``merge``) budget-merge one run; each stage cached in its
    folder and recorded (lt_records.py). A run whose stages are all there, cached or recorded, is not trained unless
    its model is needed (``need_model``). A forgetting-budget row (lt_budget.py) runs its tool, and the runs it builds
    on, instead."""
    unit = run_unit(run, args, book)
    book.claim(unit)
    book.restore(unit)
    if run.method.tool:
        bench = lt_budget.Bench(base, data, base_eval, args, evaluate, lambda needed, wanted: run_one(
            needed, base, data, base_eval, args, book, merge=False, need_model=wanted))
        row = lt_budget.run_row(run, bench)
        book.keep(unit)
        return row
    folder = unit.folder
    times_file, result_file, budget_file = folder / "seconds.json", folder / "eval.json", folder / "budget.json"
    seconds = json.loads(times_file.read_text()) if times_file.is_file() else {}
    merged = run.budget and merge
    if need_model or not result_file.is_file() or (merged and not budget_file.is_file()):
        model, train_seconds = lt_methods.train(run, base, data, folder, args)
        if train_seconds is not None and not result_file.is_file():  # the seconds of the training that is evaluated
            seconds["train"] = train_seconds
            times_file.write_text(json.dumps(seconds))  # kept if the evaluation is killed (a lease's end)
    if not result_file.is_file():
        t0 = time.time()
        evaluate(model, run.key, data, result_file, base_eval, args)
        seconds["eval"] = time.time() - t0
        times_file.write_text(json.dumps(seconds))
        book.keep(unit)
    budget = None
    if merged:
        if not budget_file.is_file():
            t0 = time.time()
            lt_methods.budget_merge(model, base, data, folder, args)
            seconds["budget"] = time.time() - t0
        budget = json.loads(budget_file.read_text())
    times_file.write_text(json.dumps(seconds))
    lt_methods.prune(folder)
    book.keep(unit)
    from deltawise.eval.results import load_result

    return {"key": run.key, "label": run.method.label, "lr": run.lr, "seed": run.seed, "steps": args.steps,
            "seconds": seconds, **lt_report.measures(load_result(result_file), data),
            "budget": lt_report.budget_summary(budget), "tool": None,
            "cost": {"total": seconds.get("train"), "parts": {"train": seconds.get("train")}}}


def item_samples(rows: list[dict], data: Data, args) -> dict[str, lt_fronts.Sample]:
    """Each evaluated run's per-item German and English prose scores beside the base's (the paired matched-gain
    comparison's input), by run key; a forgetting-budget row's when its written model was evaluated in its folder."""
    from deltawise.eval.intervals import paired_sample
    from deltawise.eval.results import load_result

    base = {d.name: d for d in load_result(args.work / "base.json").datasets}
    found = {}
    for row in rows:
        path = args.work / "runs" / row["key"] / "eval.json"
        if path.is_file():
            sets = {d.name: d for d in load_result(path).datasets}
            pairs = [paired_sample(sets[f.stem], base[f.stem]) for f in (data.german_eval, data.prose_eval)]
            if None not in pairs:
                found[row["key"]] = tuple(pairs)
    return found


def claim_work(args) -> str:
    """The base's name: ``--base`` or SmolLM2 (by name: machines keep it in different caches). A work folder's cached
    runs belong to the base that made them (``base.txt``), so another is refused."""
    if args.base is None:
        name = SMOLLM2
    elif not (args.base / "config.json").is_file():
        raise SystemExit(f"--base {args.base}: not a Hugging Face model folder (no config.json)")
    else:
        name = str(args.base.resolve())
    record = args.work / "base.txt"
    if record.is_file() and record.read_text().strip() != name:
        raise SystemExit(f"{args.work} holds runs of the base {record.read_text().strip()}, not {name}: use another --work")
    args.work.mkdir(parents=True, exist_ok=True)
    record.write_text(name + "\n")
    return name


def base_model(args) -> Path:
    if args.base is not None:
        return args.base
    from demo import fetch_smollm2

    return fetch_smollm2(console)


def plan_table(runs: list[Run], args, book: Book) -> Table:
    """Each run's stages: "done" in the work folder, "recorded" in its record (a recorded run needs no training). A
    run folder computed with other settings counts as empty (the run would refuse it: named in the caption)."""
    other = [run.key for run in runs if Book.held_otherwise(run_unit(run, args, book))]

    def in_work(run: Run, name: str) -> Optional[dict]:
        path = args.work / "runs" / run.key / name
        return json.loads(path.read_text()) if path.is_file() and run.key not in other else None

    def in_record(run: Run, name: str) -> Optional[dict]:
        return None if args.steps is None else book.recorded(run_unit(run, args, book)).get(name)

    def shown(here, recorded) -> str:
        return "recorded" if recorded else "done" if here else ""

    table = Table(title=f"language transfer (long): {len(runs)} runs, {args.steps or '?'} steps each, work {args.work}")
    for col in ("run", "method", "lr", "seed", "trained", "evaluated", "budget merge"):
        table.add_column(col)
    for run in runs:
        if run.method.tool:
            (trained, evaluated), (_, evaluated_before) = lt_budget.status(run, in_work), lt_budget.status(run, in_record)
        else:
            trained = run.key not in other and lt_methods.trained(run, args.work / "runs" / run.key)
            evaluated = in_work(run, "eval.json") is not None
            evaluated_before = in_record(run, "eval.json") is not None
        budget = shown(in_work(run, "budget.json"), in_record(run, "budget.json")) if run.budget else "-"
        table.add_row(run.key, run.method.label, "search" if run.lr is None else f"{run.lr:g}", str(run.seed),
                      shown(trained, evaluated_before), shown(evaluated, evaluated_before), budget)
    if other:
        table.caption = f"computed with other settings in the work folder (move them away to run them): {', '.join(other)}"
    return table


def finished_pilot(args, book: Book) -> tuple[Optional[dict], str]:
    """The finished pilot's pilot.json, the work folder's or else the recorded one, and which ("done", "recorded").
    The main runs take their steps from it: a recorded pilot serves when made on the same base and sets with the same
    scoring, whatever the pilot's own options and seed (``--seeds`` may differ in a main run)."""
    pilot_file = args.work / "pilot" / "pilot.json"
    if pilot_file.is_file():
        return json.loads(pilot_file.read_text()), "done"
    return book.recorded(pilot_unit(args, book), same=list(book.common)).get("pilot.json"), "recorded"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-work/language_transfer_long"))
    ap.add_argument("--pilot", action="store_true", help="run the pilot (step count at which English is forgotten)")
    ap.add_argument("--plan", action="store_true", help="print the runs and which are done; run nothing")
    ap.add_argument("--methods", default="all", help="comma-separated method labels (" + ",".join(lt_methods.LABELS) + ")")
    ap.add_argument("--seeds", type=seed_list_or_none, default="0,1,2",
                    help='seeds of each method at its usual learning rate ("": none, only the sweep\'s other rates)')
    ap.add_argument("--sweep-seeds", type=seed_list_or_none, default="0", help="seeds at the other learning rates of the sweep")
    ap.add_argument("--lrs", type=rate_list, default=None,
                    help="only the runs at these learning rates (comma-separated, each a rate of a method's sweep; "
                         "full-lr-sweep, which picks its own, is left out); default: every rate")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the pilot's result)")
    ap.add_argument("--pilot-steps", type=int, default=1000)
    ap.add_argument("--pilot-every", type=int, default=100)
    ap.add_argument("--pilot-lr", type=float, default=1e-4)
    ap.add_argument("--bam-rounds", type=int, default=4, help="BaM rounds of 2 branches; each branch trains steps/(2·rounds)")
    ap.add_argument("--budget", type=float, default=0.99, help="retention budget of the merge with the base (English prose)")
    ap.add_argument("--retain-budget", type=float, default=0.98,
                    help="English prose retention budget of the forgetting-budget rows (full-guard, full-repair, full-lr-sweep)")
    ap.add_argument("--lr-sweep-steps", type=int, default=None,
                    help="steps of each short run of full-lr-sweep (default: a quarter of --steps)")
    ap.add_argument("--lr-sweep-examples", type=int, default=2000,
                    help="full-lr-sweep's short runs train on the first N German training texts")
    ap.add_argument("--checkpoints", type=int, default=10,
                    help="training checkpoints per run, to resume a killed run from (0: none; a GPU's runs are short)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-items", type=int, default=300, help="evaluation items per perplexity set")
    ap.add_argument("--select-items", type=int, default=150, help="selection items per set (budget merges)")
    ap.add_argument("--mc-items", type=int, default=400, help="WordNet multiple-choice items")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--gain-levels", default="", help="target gains to compare methods at (default: 4 common to all fronts)")
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda[:N]")
    ap.add_argument("--recorded-only", action="store_true",
                    help="compute nothing: the tables of the runs recorded (or cached in --work); the others are listed")
    ap.add_argument("--base", type=Path, default=None,
                    help="base model folder (default: SmolLM2-135M-Instruct, fetched by examples/demo.py); one per --work; "
                         "its results are not recorded")
    add_record_argument(ap, "keep results only in --work, not in benchmarks/records/language_transfer_long/ (always so "
                            "with --base)")
    args = ap.parse_args(argv)
    if args.checkpoints < 0:
        ap.error(f"--checkpoints {args.checkpoints}: give 0 (none) or more")
    methods = lt_methods.select(args.methods)
    runs = lt_methods.plan(methods, args.seeds, args.sweep_seeds, args.lrs)
    name = claim_work(args)
    args.device = resolve_device(args.device)  # the records of each kind of device are kept apart (lt_records.py)
    data = prepare_data(args.work / "data", args.eval_items, args.select_items, args.mc_items, seed=0)
    book = Book(lt_records.common_settings(name, data, args), enabled=not args.no_record and args.base is None,
                say=lambda message: console.print(f"  {message}", markup=False, highlight=False, soft_wrap=True))
    finished, where = finished_pilot(args, book) if args.steps is None or args.plan else (None, "")
    if args.steps is None and finished:
        args.steps = lt_report.main_steps(finished)
    if args.plan:
        steps = finished and lt_report.main_steps(finished)
        pilot_state = "not run" if not finished else (
            f"{where}: its final checkpoint ({steps} steps) forgets English prose: the main runs' length" if steps else
            f"{where}: its final checkpoint does not forget English prose measurably (train a longer pilot)")
        console.print(f"pilot: {pilot_state}")
        console.print(plan_table(runs, args, book))
        return

    started = time.time()
    base = base_model(args)
    payload = {"benchmark": "language_transfer_long", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(args.device),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "data": data.counts(), "data_sha256": book.common["data"]}
    if args.pilot:
        try:
            record = pilot(base, data, args, book)
        except lt_methods.NotComputed as e:
            raise SystemExit(f"the pilot: {e}; nothing to show") from None
        console.print(lt_report.pilot_table(record))
        payload["pilot"] = record
    else:
        if not args.steps:
            raise SystemExit("no --steps: run --pilot first (it finds the step count; its final checkpoint must forget "
                             "English prose measurably) or give --steps N")
        try:
            base_eval = base_evaluation(base, data, args, book)
        except lt_methods.NotComputed as e:
            raise SystemExit(f"the base's evaluation: {e}; nothing to show") from None
        rows, absent = [], []
        for run in runs:
            t0 = time.time()
            try:
                rows.append(run_one(run, base, data, base_eval, args, book))
            except lt_methods.NotComputed as e:  # the tables show the recorded runs
                absent.append(run.key)
                console.print(f"  {run.key}: {e}: left out")
                continue
            console.print(f"  {run.key}: gain {rows[-1]['target_gain']:+.3f}, prose retention "
                          f"{rows[-1]['prose_retention']:.4f} ({time.time() - t0:.0f} s)")
        levels = [float(x) for x in args.gain_levels.split(",") if x]
        payload |= lt_report.tables(rows, levels, console, item_samples(rows, data, args),
                                    [m.label for m in lt_methods.METHODS if m.replay])
        payload["runs"] = rows
        if absent:
            console.print(f"left out (not recorded): {', '.join(absent)}")
            payload["left_out"] = absent
    payload["seconds"] = time.time() - started
    out = args.work / ("pilot_summary.json" if args.pilot else "language_transfer_long.json")
    out.write_text(json.dumps(payload, indent=2, default=str))
    console.print(f"JSON: {out}; done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
