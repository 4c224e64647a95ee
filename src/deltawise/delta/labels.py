"""Class labels of a classifier that a delta or adapter trained: what ``train`` recorded, written into a config.

``train --task classification`` on string labels records ``label2id`` in ``deltawise_train.json`` beside
the delta or PEFT adapter; the head itself is a tensor the base lacks. Every command that turns the
delta into a model (``apply``, ``merge``, loading for ``eval``) writes those labels into the model's
config (``label2id``, ``id2label``, hence ``num_labels``), so the same JSONL evaluates on the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from deltawise.architecture import Role, TensorRoles

TRAIN_RECORD = "deltawise_train.json"


def trained_labels(folder: Path) -> dict[str, int]:
    """The ``label2id`` that ``train`` recorded in ``deltawise_train.json`` beside a classification delta ({} if none)."""
    try:
        record = json.loads((Path(folder) / TRAIN_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    labels = record.get("label2id") if isinstance(record, dict) else None
    return {str(k): int(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def head_labels(folder: Path, head_rows: int) -> dict[str, int]:
    """The labels of a new classification head of ``head_rows`` classes: the recorded ones, else
    transformers' defaults (``LABEL_0`` ...), so the config's ``num_labels`` matches the head."""
    recorded = trained_labels(folder)
    return recorded if len(recorded) == head_rows else {f"LABEL_{i}": i for i in range(head_rows)}


def with_labels(config: dict[str, Any], label2id: dict[str, int]) -> dict[str, Any]:
    """``config`` (a config.json mapping) for a sequence classifier with these labels: ``label2id``,
    ``id2label`` and, for a causal LM's config, a ``...ForSequenceClassification`` architecture."""
    out = dict(config)
    out["label2id"] = dict(label2id)
    out["id2label"] = {str(i): name for name, i in sorted(label2id.items(), key=lambda kv: kv[1])}
    architectures = out.get("architectures")
    if isinstance(architectures, list):
        out["architectures"] = [a.removesuffix("ForCausalLM") + "ForSequenceClassification" if a.endswith("ForCausalLM") else a
                                for a in architectures]
    return out


def added_head_rows(added: dict[str, Any], roles: TensorRoles) -> Optional[int]:
    """The number of classes of the classification head among ``added`` (tensor name -> info with
    ``shape``) that a delta adds to its base, or None when it adds none."""
    rows = {info.shape[0] for name, info in added.items() if roles.role(name) == Role.CLASSIFIER and len(info.shape) == 2}
    return rows.pop() if len(rows) == 1 else None
