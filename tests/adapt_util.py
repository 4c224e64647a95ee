"""Helpers for the adaptation tests: a tiny Llama with a tokenizer, a data file, one training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DOCS = [
    "Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.",
    "Complex is better than complicated.", "Flat is better than nested.", "Sparse is better than dense.",
    "Readability counts, and errors should never pass silently.", "Now is better than never, although never is often better.",
]


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> dict[str, Path]:
    """Read-only: ``model`` (Llama hidden 32, 2 layers, tokenizer), ``data`` (8 '%'-separated docs),
    ``jsonl`` (prompt/response), ``cls`` (text/label JSONL)."""
    from deltawise.adapt.tiny import save_tiny_llama

    root = tmp_path_factory.mktemp("tiny_lm")
    model = save_tiny_llama(root / "model", DOCS * 4, hidden=32, layers=2, vocab=96)
    data = root / "data.txt"
    data.write_text("\n%\n".join(DOCS) + "\n")
    jsonl = root / "pr.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": d.split(" is ")[0] + " is", "response": " " + d.split(" is ", 1)[-1]}) + "\n" for d in DOCS))
    cls = root / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": d, "label": "neg" if "ugly" in d or "never" in d else "pos"}) + "\n" for d in DOCS))
    return {"model": model, "data": data, "jsonl": jsonl, "cls": cls, "root": root}


def batch_of(tiny_lm: dict[str, Path], task: str = "causal_lm", data: Path | None = None) -> dict[str, torch.Tensor]:
    """The whole data file as one padded batch, tokenized exactly as the trainer does."""
    from deltawise.adapt.data import Collator, label_mapping, read_examples, tokenize
    from deltawise.adapt.train import load_tokenizer

    tok = load_tokenizer(tiny_lm["model"])
    ex = read_examples(data or tiny_lm["data"], task)
    l2i = label_mapping(ex) if task == "classification" else None
    return Collator(tok.pad_token_id, task)(tokenize(ex, tok, 64, task, l2i))


def base_model(folder: Path, task: str = "causal_lm", num_labels: int | None = None):
    from deltawise.adapt.train import load_model, load_tokenizer

    return load_model(folder, task, num_labels, load_tokenizer(folder).pad_token_id).eval()


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def one_step(model, batch, params, lr: float, optimizer=None) -> None:
    """What the trainer does for one step with grad-accum 1: loss, backward, clip at 1.0, AdamW."""
    model.train()
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad()


def train_cfg(tiny_lm, out: Path, method: str, options=None, **kw):
    from deltawise.adapt import MethodOptions, TrainConfig

    base = dict(model=tiny_lm["model"], data=tiny_lm["data"], output=out, method=method, max_steps=1, batch_size=8,
                lr=1e-2, seed=0, progress=False, options=options or MethodOptions())
    base.update(kw)
    return TrainConfig(**base)
