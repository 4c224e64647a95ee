"""Data for the data-driven methods (fisher, gram, soup, atlas): read a dataset, tell its task, batch it for a model.

Files are read by ``deltawise.data.read.load_items`` (plain text, JSONL, or a ``datasets`` folder saved
with ``save_to_disk``; anything else is an InputError) and tokenized by ``adapt.data`` (EOS-terminated
documents for causal LMs; ``text``/``label`` rows for classifiers), so these commands accept
exactly what ``deltawise eval`` and ``deltawise train`` accept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch

from deltawise.adapt.data import Collator, Example, tokenize
from deltawise.data.read import Item, load_items
from deltawise.errors import InputError
from deltawise.eval.classify import label_index
from deltawise.eval.models import LoadedModel

Task = Literal["classification", "causal_lm"]
TASKS = ("auto", "classification", "causal_lm")


@dataclass
class TaskData:
    path: Path
    task: Task
    items: list[Item]

    @property
    def labelled(self) -> bool:
        return all("label" in i.fields for i in self.items)


def load_data(path: str | Path, task: str = "auto", *, need_labels: bool = False, limit: Optional[int] = None) -> TaskData:
    """Items of ``path`` with their task: ``auto`` is classification when items carry a ``label``,
    else causal LM. ``need_labels`` refuses unlabelled data (empirical Fisher, cross-entropy)."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    items = load_items(path, require=("text",))
    if task == "auto":
        task = "classification" if "label" in items[0].fields else "causal_lm"
    if need_labels:
        unlabelled = [i for i in items if "label" not in i.fields]
        if unlabelled:
            raise InputError(f"{unlabelled[0].where}: this needs labelled data ('text' and 'label'); this item has no 'label'")
    if limit is not None:
        items = items[:limit]
    return TaskData(Path(path), task, items)  # type: ignore[arg-type]


def encode(lm: LoadedModel, data: TaskData, max_length: int) -> list[dict]:
    """Token rows as the trainer makes them; classification rows carry the model's label id
    (or -1 for unlabelled items, used only by label-free objectives)."""
    if data.task == "classification":
        rows = []
        for item in data.items:
            ids = lm.tokenizer(item.text, truncation=True, max_length=max_length)["input_ids"]
            rows.append({"input_ids": ids, "labels": label_index(lm, item) if "label" in item.fields else -1})
        return rows
    return tokenize([Example(text=i.text) for i in data.items], lm.tokenizer, max_length, "causal_lm")


def batches(lm: LoadedModel, rows: list[dict], task: Task, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches in order, on the model's device."""
    collate = Collator(lm.pad_id, task)
    device = next(lm.model.parameters()).device
    for start in range(0, len(rows), batch_size):
        yield {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}


def endless_batches(lm: LoadedModel, rows: list[dict], task: Task, batch_size: int,
                    seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches forever (a new order every pass), for training loops that count steps."""
    rng = random.Random(seed)
    while True:
        order = rows[:]
        rng.shuffle(order)
        yield from batches(lm, order, task, batch_size)


def head_for(task: Task) -> str:
    return "classification" if task == "classification" else "causal_lm"
