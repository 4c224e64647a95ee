"""Turn what ``train`` wrote (a PEFT adapter, a deltawise delta or a full model) into a full model folder.

Merging (BaM rounds, recipes over weights) needs whole models. A ``full`` run already is one; an
adapter is folded into the weights it was trained on: PEFT adapters with PEFT's own
``merge_and_unload`` (every PEFT method, LoRA to RandLoRA, knows how to fold itself), our delta
folders with ``apply_to_model``. The model is loaded, folded and saved in float32, the dtype
training used, and written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deltawise.adapt.train import load_model, load_tokenizer
from deltawise.errors import InputError
from deltawise.io.output import staged_output

TRAIN_RECORD = "deltawise_train.json"


def train_record(folder: Path) -> dict:
    path = Path(folder) / TRAIN_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{folder} is not a deltawise train output (no readable {TRAIN_RECORD})") from None


@torch.no_grad()
def materialize(trained: Path, start_model: Path, out: Path, *, trust_remote_code: bool = False) -> Path:
    """The full model of the train output ``trained`` (made from ``start_model``): ``trained``
    itself for a full fine-tune, else a new folder ``out`` holding start model + adapter."""
    record = train_record(trained)
    kind = record["kind"]
    if kind == "full":
        return Path(trained)
    task = record.get("task", "causal_lm")
    tok = load_tokenizer(start_model, trust_remote_code=trust_remote_code)
    labels = record.get("label2id") or {}
    model = load_model(start_model, task, len(labels) if labels else None, tok.pad_token_id,
                       trust_remote_code=trust_remote_code)
    if kind == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, trained).merge_and_unload()
    elif kind == "delta":
        from deltawise.delta.apply import apply_to_model

        apply_to_model(model, trained)
    else:
        raise InputError(f"{trained}: unknown output kind {kind!r}")
    if labels:
        model.config.label2id = dict(labels)
        model.config.id2label = {v: k for k, v in labels.items()}
    with staged_output(Path(out)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
    return Path(out)
