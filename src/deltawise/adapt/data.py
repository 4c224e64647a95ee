"""Training data: turn what ``deltawise.data.read`` reads into examples, tokenize and batch them (optionally
mixing in replay data).

Files are read as every command reads them (formats, refused files and the document-splitting rule are
in ``deltawise.data.read``); what a record means to training:
- plain text: each document is one example (every token in the loss);
- a record with a ``text`` field: one example;
- a record with ``prompt`` and ``response``: the loss covers the response tokens only;
- a record with ``messages`` (role/content list, TRL's conversational format): rendered with the tokenizer's
  chat template, the loss covers the assistant turns only (``deltawise.adapt.chat``);
- classification (``task="classification"``): records with ``text`` and ``label`` (int or string).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltawise.adapt.chat import IGNORE_INDEX, Messages, chat_row, parse_messages, require_chat_template
from deltawise.data.read import Item, read_data
from deltawise.errors import InputError

__all__ = ["IGNORE_INDEX", "Collator", "Example", "ReplayMixSampler", "label_mapping", "read_examples", "tokenize"]


@dataclass(frozen=True)
class Example:
    """One training example before tokenization. ``prompt`` is excluded from the loss; ``messages``: a chat
    conversation (``text`` is then empty)."""

    text: str
    prompt: str = ""
    label: Any = None
    messages: Messages = ()


def read_examples(path: Path, task: str = "causal_lm") -> list[Example]:
    """Every example of ``path``, read by ``deltawise.data.read`` as every command reads data; InputError
    naming the file (and line, for JSONL) on bad records."""
    data = read_data(path)
    if data.format == "text" and task == "classification":
        raise InputError(f"{data.path}: classification data must be JSONL with 'text' and 'label' fields")
    examples = [_example(item, task) for item in data.items]
    if not examples:
        raise InputError(f"{data.path}: no training examples found")
    return examples


def _example(item: Item, task: str) -> Example:
    """What a record means to training: ``text``; ``prompt`` + ``response``; ``text`` + ``label`` for classification."""
    rec = item.fields
    if task == "classification":
        if "text" not in rec or "label" not in rec:
            raise InputError(f"{item.origin}: classification records need 'text' and 'label'")
        return Example(text=str(rec["text"]), label=rec["label"])
    if "messages" in rec:
        return Example(text="", messages=parse_messages(rec["messages"], item.origin))
    if "prompt" in rec and "response" in rec:
        return Example(text=str(rec["response"]), prompt=str(rec["prompt"]))
    if "text" in rec:
        return Example(text=str(rec["text"]))
    raise InputError(f"{item.origin}: need a 'text' field, 'prompt' and 'response' fields, or chat 'messages'")


def label_mapping(examples: list[Example]) -> dict[Any, int]:
    """Integer labels map to themselves; string labels to their index in sorted order."""
    labels = {e.label for e in examples}
    if all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        return {x: x for x in sorted(labels)}
    return {x: i for i, x in enumerate(sorted(str(x) for x in labels))}


def tokenize(examples: list[Example], tokenizer, max_length: int, task: str,
             label2id: dict | None = None) -> list[dict[str, list[int]]]:
    """Tokenize to lists of ids. Causal LM: ``labels`` copy the ids, with prompt tokens masked out;
    an EOS token ends each document so the model learns where documents stop. Chat examples go through
    the tokenizer's chat template (``deltawise.adapt.chat``)."""
    rows = []
    if task != "classification" and any(ex.messages for ex in examples):
        require_chat_template(tokenizer)
    for ex in examples:
        if ex.messages and task != "classification":
            row = chat_row(ex.messages, tokenizer, max_length)
            if row is not None:
                rows.append(row)
            continue
        if task == "classification":
            ids = tokenizer(ex.text, truncation=True, max_length=max_length)["input_ids"]
            key = ex.label if ex.label in label2id else str(ex.label)
            rows.append({"input_ids": ids, "labels": label2id[key]})
            continue
        prompt_ids = tokenizer(ex.prompt)["input_ids"] if ex.prompt else []
        # the response continues the prompt, so it gets no BOS of its own
        body = tokenizer(ex.text, add_special_tokens=not ex.prompt)["input_ids"]
        if tokenizer.eos_token_id is not None:
            body = body + [tokenizer.eos_token_id]
        ids = (prompt_ids + body)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + body)[:max_length]
        if all(x == IGNORE_INDEX for x in labels) or len(ids) < 2:
            continue  # nothing to learn from: the prompt fills the whole window
        rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise InputError("no example left after tokenization (are the prompts longer than --max-length?)")
    return rows


class Collator:
    """Right-pads a list of tokenized rows into tensors (labels padded with IGNORE_INDEX)."""

    def __init__(self, pad_id: int, task: str):
        self.pad_id = pad_id
        self.task = task

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.task == "classification":
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        else:
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
            batch["labels"] = labels
        return batch


class ReplayMixSampler(torch.utils.data.Sampler[int]):
    """Indices into ``target rows + replay rows`` (replay rows after the ``n_target`` target rows)
    such that every consecutive ``batch_size`` indices hold ``round(fraction·batch_size)`` replay
    rows (at least one, at most ``batch_size − 1``) and every target row appears once per epoch.

    Each epoch (``set_epoch``, which the trainer calls) is drawn anew from ``(seed, epoch)``: the
    target order is reshuffled, and replay rows continue a seeded stream of reshuffled passes over
    the replay set, so consecutive epochs replay different rows and no row repeats before the
    whole replay set has been used. Every process of a multi-process run draws the same order,
    and the trainer hands whole batches to processes, so each process's batch holds the fraction.
    """

    def __init__(self, n_target: int, n_replay: int, batch_size: int, fraction: float, seed: int):
        if not 0.0 < fraction < 1.0:
            raise InputError(f"--replay-fraction must be in (0, 1), got {fraction}")
        if batch_size < 2:
            raise InputError("replay needs --batch-size of at least 2 (a batch holds target and replay rows)")
        self.n_target, self.n_replay, self.seed = n_target, n_replay, seed
        self.n_rep = min(batch_size - 1, max(1, round(fraction * batch_size)))
        self.n_new = batch_size - self.n_rep
        self.chunks = math.ceil(n_target / self.n_new)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_target + self.chunks * self.n_rep

    def _replay_stream(self, start: int, count: int) -> list[int]:
        """Items ``start .. start+count`` of the endless stream of seeded shuffled passes over the replay set."""
        out: list[int] = []
        cycle, pos = divmod(start, self.n_replay)
        while len(out) < count:
            order = list(range(self.n_replay))
            random.Random(f"{self.seed}:replay:{cycle}").shuffle(order)
            out.extend(order[pos : pos + count - len(out)])
            cycle, pos = cycle + 1, 0
        return out

    def __iter__(self):
        rng = random.Random(f"{self.seed}:epoch:{self.epoch}")
        target = list(range(self.n_target))
        rng.shuffle(target)
        per_epoch = self.chunks * self.n_rep
        replay = [self.n_target + i for i in self._replay_stream(self.epoch * per_epoch, per_epoch)]
        for c in range(self.chunks):
            chunk = target[c * self.n_new : (c + 1) * self.n_new] + replay[c * self.n_rep : (c + 1) * self.n_rep]
            rng.shuffle(chunk)  # replay rows at random places within their batch
            yield from chunk
