"""Classification accuracy with a sequence-classification model on ``{"text", "label"}`` items."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from deltawise.data.read import Item
from deltawise.errors import InputError
from deltawise.eval.models import LoadedModel
from deltawise.eval.scoring import Progress


@dataclass(frozen=True)
class ClassOutcome:
    id: str
    predicted: int
    label: int

    @property
    def correct(self) -> bool:
        return self.predicted == self.label


def label_index(lm: LoadedModel, item: Item) -> int:
    label = item.fields["label"]
    n = lm.model.config.num_labels
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise InputError(f"{item.where}: label must be an int or a label name, got {label!r}")
    if isinstance(label, str):
        label2id = lm.model.config.label2id or {}
        if label not in label2id:
            unnamed = all(name == f"LABEL_{i}" for name, i in label2id.items())
            hint = ("; the model's config names no labels: evaluate the folder train wrote (it records label2id) or "
                    "the model apply or merge made from it, which carries the names") if unnamed else ""
            raise InputError(f"{item.where}: label {label!r} is not one of the model's labels {sorted(label2id)}{hint}")
        label = int(label2id[label])
    if not 0 <= label < n:
        raise InputError(f"{item.where}: label {label} outside the model's {n} classes")
    return label


@torch.no_grad()
def class_logits(
    lm: LoadedModel, items: Sequence[Item], *, max_length: int, batch_size: int = 8, progress: Progress | None = None
) -> Iterator[torch.Tensor]:
    """Logits of each batch of ``items``, in order."""
    device = next(lm.model.parameters()).device
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        enc = lm.tokenizer([i.text for i in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield lm.model(**{k: v.to(device) for k, v in enc.items()}).logits
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))


def classify(
    lm: LoadedModel, items: Sequence[Item], *, max_length: int, batch_size: int = 8, progress: Progress | None = None
) -> list[ClassOutcome]:
    labels = [label_index(lm, item) for item in items]  # validate every label before running the model
    predicted = [p for logits in class_logits(lm, items, max_length=max_length, batch_size=batch_size, progress=progress)
                 for p in logits.argmax(-1).tolist()]
    return [ClassOutcome(item.id, int(pred), label) for item, pred, label in zip(items, predicted, labels)]
