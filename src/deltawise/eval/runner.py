"""``deltawise eval``: evaluate one model on source/target datasets and write an EvalResult."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from deltawise.data.read import Item, load_items
from deltawise.errors import InputError
from deltawise.eval.choice import Norm, multiple_choice
from deltawise.eval.classify import classify
from deltawise.eval.lm_eval_bridge import run_lm_eval
from deltawise.eval.models import LoadedModel, load_model, model_fingerprint
from deltawise.eval.perplexity import perplexity
from deltawise.eval.results import DatasetResult, EvalResult, Role, Task
from deltawise.eval.scoring import Progress
from deltawise.io.resolve import resolve_model

# (stage description, total) -> per-step callback; lets the CLI draw a rich bar per dataset
ProgressFactory = Callable[[str], Progress]


@dataclass
class EvalOptions:
    max_length: int | None = None  # default: the model's context, capped at 1024
    stride: int | None = None  # default: max_length // 2
    batch_size: int = 8
    mc_norm: Norm = "total"
    dtype: str = "float32"
    device: str = "cpu"
    progress: ProgressFactory | None = None
    lm_eval_tasks: list[tuple[Role, str]] = field(default_factory=list)
    lm_eval_tasks_dir: Path | None = None  # extra lm-eval task YAMLs (TaskManager include_path)
    trust_remote_code: bool = False  # run Python code shipped in a model folder (--trust-remote-code)
    base: str | None = None  # a delta or adapter model: its base, instead of the one it records (--base)


def detect_task(items: list[Item]) -> Task:
    first = items[0].fields
    if "choices" in first:
        return "multiple_choice"
    if "label" in first:
        return "classification"
    if "text" in first:
        return "perplexity"
    raise InputError(f"cannot tell the task from fields {sorted(first)}: need 'text', 'text'+'label', or 'choices'+'answer'")


REQUIRED = {"perplexity": ("text",), "classification": ("text", "label"), "multiple_choice": ("choices", "answer")}


def unique_names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        stem = p.stem or p.name
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


class Evaluator:
    """Loads the model lazily per head (causal LM for text and choices, classifier for labels)."""

    def __init__(self, model_ref: str, options: EvalOptions):
        self.ref = model_ref
        self.options = options
        self._models: dict[str, LoadedModel] = {}

    def model(self, head: str) -> LoadedModel:
        if head not in self._models:
            self._models[head] = load_model(self.ref, head, dtype=self.options.dtype, device=self.options.device,
                                            trust_remote_code=self.options.trust_remote_code, base=self.options.base)
        return self._models[head]

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def limits(self, lm: LoadedModel) -> tuple[int, int]:
        max_length = self.options.max_length or min(lm.context_length, 1024)
        stride = self.options.stride or max(max_length // 2, 1)
        return max_length, min(stride, max_length)

    def dataset(self, path: Path, name: str, role: Role) -> DatasetResult:
        items = load_items(path, require=())
        task = detect_task(items)
        items = load_items(path, require=REQUIRED[task])
        opts = self.options
        lm = self.model("classification" if task == "classification" else "causal_lm")  # loading is not timed
        max_length, stride = self.limits(lm)
        return score_dataset(lm, items, task, name=name, role=role, path=str(path), max_length=max_length, stride=stride,
                             batch_size=opts.batch_size, mc_norm=opts.mc_norm,
                             progress=opts.progress(f"{role} {name}") if opts.progress else None)


def score_dataset(lm: LoadedModel, items: list[Item], task: Task, *, name: str, role: Role, path: str, max_length: int,
                  stride: int, batch_size: int, mc_norm: Norm = "total", progress: Progress | None = None) -> DatasetResult:
    """Score a loaded model on one dataset's items: perplexity, classification or multiple-choice accuracy, with
    per-item results. Every evaluation and every search that scores candidates (retention budget, greedy soup,
    aTLAS validation) comes through here, so their numbers agree with ``deltawise eval``'s."""
    start = time.perf_counter()
    common = dict(name=name, role=role, task=task, path=path, n_items=len(items))
    if task == "perplexity":
        docs = lm.tokenizer([i.text for i in items])["input_ids"]  # one call: fast tokenizers encode a batch in parallel
        ppl = perplexity(lm.model, docs, max_length=max_length, stride=stride, batch_size=batch_size, pad_id=lm.pad_id,
                         progress=progress)
        seconds = time.perf_counter() - start
        ids = [i.id for i in items]
        return DatasetResult(**common, metric="perplexity", value=ppl.value, higher_is_better=False, mean_nll=ppl.mean_nll,
                             n_tokens=ppl.n_tokens, seconds=seconds, tokens_per_s=ppl.n_tokens / seconds if seconds else None,
                             per_item_nll=dict(zip(ids, ppl.per_document_nll)),
                             per_item_tokens=dict(zip(ids, ppl.per_document_tokens)))
    if task == "multiple_choice":
        outcomes = multiple_choice(lm, items, norm=mc_norm, max_length=max_length, batch_size=batch_size, progress=progress)
        metric = "accuracy" if mc_norm == "total" else f"accuracy_{mc_norm}_norm"
    else:
        outcomes = classify(lm, items, max_length=max_length, batch_size=batch_size, progress=progress)
        metric = "accuracy"
    seconds = time.perf_counter() - start
    per_item = {o.id: float(o.correct) for o in outcomes}
    return DatasetResult(**common, metric=metric, value=sum(per_item.values()) / len(per_item), higher_is_better=True,
                         seconds=seconds, per_item=per_item)


def evaluate(model_ref: str, sources: list[Path], targets: list[Path], options: EvalOptions) -> EvalResult:
    if not sources and not targets and not options.lm_eval_tasks:
        raise InputError("nothing to evaluate: give --source and/or --target data (or --tasks)")
    path = resolve_model(model_ref)
    fingerprint = model_fingerprint(path, base=options.base)  # fail on a broken folder (or a misfit delta) before any data
    evaluator = Evaluator(model_ref, options)
    roles: list[Role] = ["source"] * len(sources) + ["target"] * len(targets)
    paths = list(sources) + list(targets)
    datasets = [evaluator.dataset(p, n, r) for p, n, r in zip(paths, unique_names(paths), roles)]
    if options.lm_eval_tasks:
        datasets += run_lm_eval(evaluator.model("causal_lm"), options.lm_eval_tasks, batch_size=options.batch_size,
                                tasks_dir=options.lm_eval_tasks_dir)
    settings: dict[str, object] = {k: getattr(options, k) for k in ("batch_size", "mc_norm", "dtype", "device")}
    for lm in evaluator.loaded():
        settings["max_length"], settings["stride"] = evaluator.limits(lm)
    warnings = sorted({w for lm in evaluator.loaded() for w in lm.warnings})
    if warnings:  # a delta on a base other than the one it records
        settings["warnings"] = warnings
    return EvalResult(model=str(path), fingerprint=fingerprint, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      settings=settings, datasets=datasets)
