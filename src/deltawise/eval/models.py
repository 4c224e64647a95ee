"""Load a model folder for evaluation: the network, its tokenizer, and the weights' fingerprint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltawise.errors import InputError
from deltawise.io.reader import ModelReader
from deltawise.io.resolve import resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    fingerprint: str

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024))


def model_fingerprint(path: Path) -> str:
    reader = ModelReader(path)
    try:
        return reader.fingerprint()
    finally:
        reader.close()


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise InputError(f"model {str(path)!r}: no usable tokenizer in the folder ({type(exc).__name__}: {exc})") from None


def load_model(ref: str | Path, head: str = "causal_lm", *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load ``ref`` with a causal-LM head (``head="causal_lm"``) or a sequence-classification head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model(str(ref))
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    try:
        model = auto.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"model {str(path)!r} cannot be loaded as a {head.replace('_', ' ')} model: {exc}") from None
    model.to(device).eval()
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so any id will do
    if head != "causal_lm" and model.config.pad_token_id is None:
        # sequence classifiers over decoder LMs find the last real token through pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoadedModel(path, model, tokenizer, model_fingerprint(path))
