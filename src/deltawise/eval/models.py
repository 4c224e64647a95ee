"""Load a model for evaluation: the network, its tokenizer, and the weights' fingerprint.

The model is a checkpoint folder (or hub id), or a delta: a deltawise delta folder or a PEFT adapter
folder, loaded as its base plus the delta (``load_model``, ``model_fingerprint``), the base being the
one the delta records unless ``base`` names another. This is the one loader of "a model, or base +
delta" for every command that runs a network (eval, analyze interpolate, and the searches).

Also the one guard against code shipped in a model folder (``refuse_remote_code``), used by every
loader (eval, analyze interpolate, fisher, gram, soup, atlas, budget here; train and bam through
``deltawise.adapt.train``): transformers is always called with an explicit ``trust_remote_code``,
so it never asks on the terminal (it would read the answer from stdin), and a folder whose
architecture exists only as its own Python files is refused unless ``--trust-remote-code`` is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltawise.delta.labels import trained_labels
from deltawise.errors import InputError
from deltawise.io.resolve import resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    fingerprint: str
    warnings: list[str] = field(default_factory=list)  # e.g. a delta applied to a base other than the recorded one

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024))


def model_fingerprint(path: Path, *, base: str | None = None) -> str:
    """The fingerprint of a checkpoint's weights, or of base + delta for a delta or adapter folder."""
    from deltawise.delta.reader import open_model

    reader = open_model(str(path), base_ref=base)
    try:
        return reader.fingerprint()
    finally:
        reader.close()


def is_delta_ref(ref: str | Path) -> bool:
    """True when ``ref`` names a local deltawise delta folder or PEFT adapter folder (not a full model)."""
    from deltawise.delta.source import is_delta

    folder = Path(ref)
    return folder.is_dir() and is_delta(folder)


def remote_code_files(path: Path) -> tuple[list[str], list[str]]:
    """(config files with an ``auto_map``, Python files) of a model folder: the code transformers would import."""
    folder = Path(path)
    if not folder.is_dir():
        return [], []
    mapped = []
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            mapped.append(name)
    return mapped, sorted(p.name for p in folder.glob("*.py"))


def needs_remote_code(path: Path) -> bool:
    """True when the folder's ``model_type`` is unknown to transformers: only the folder's own code could load it."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # no readable config: transformers reports that itself
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return not isinstance(model_type, str) or model_type not in CONFIG_MAPPING


def refuse_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse a folder that ships code (``auto_map``) transformers cannot replace with its own classes,
    unless the user passed ``--trust-remote-code``. A folder with an ``auto_map`` whose architecture
    transformers knows loads with the built-in classes; its code is never imported."""
    if trust_remote_code:
        return
    mapped, code = remote_code_files(path)
    if mapped and needs_remote_code(path):
        files = ", ".join(mapped + code)
        raise InputError(f"model {str(path)!r} can only be loaded by running the Python code in the folder ({files}); "
                         "deltawise does not run it unless you pass --trust-remote-code (read the files first)")


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    refuse_remote_code(path, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise InputError(f"model {str(path)!r}: no usable tokenizer in the folder ({type(exc).__name__}: {exc})") from None


def load_model(ref: str | Path, head: str = "causal_lm", *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, base: str | None = None, num_labels: int | None = None) -> LoadedModel:
    """Load ``ref`` with a causal-LM head (``head="causal_lm"``) or a sequence-classification head;
    code in the folder runs only with ``trust_remote_code`` (``refuse_remote_code``).

    A delta or adapter folder loads as its base plus the delta (``base`` overrides the recorded base).
    ``num_labels`` sizes a classification head the checkpoint does not have (a causal LM's new head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model(str(ref))
    if is_delta_ref(path):
        return load_base_plus_delta(path, head, dtype=dtype, device=device, trust_remote_code=trust_remote_code, base=base)
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    refuse_remote_code(path, trust_remote_code)
    try:
        sized = {"num_labels": num_labels} if num_labels and head != "causal_lm" else {}
        model = auto.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **sized)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"model {str(path)!r} cannot be loaded as a {head.replace('_', ' ')} model: {exc}") from None
    model.to(device).eval()
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so any id will do
    if head != "causal_lm" and model.config.pad_token_id is None:
        # sequence classifiers over decoder LMs find the last real token through pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoadedModel(path, model, tokenizer, model_fingerprint(path))


def load_base_plus_delta(delta: Path, head: str = "causal_lm", *, dtype: str = "float32", device: str = "cpu",
                         trust_remote_code: bool = False, base: str | None = None) -> LoadedModel:
    """The base model with the delta (or PEFT adapter) ``delta`` added to its tensors, as ``apply`` would write it.

    The base is ``base`` when given, else the one the delta records; the delta's tensors are checked against it
    (names, shapes, architecture) before anything loads. The tokenizer is the delta folder's when it has one
    (``train`` saves it there), else the base's.
    """
    from deltawise.delta.apply import apply_to_model
    from deltawise.delta.reader import open_model

    reader = open_model(str(delta), base_ref=base)  # raises when the delta does not fit the base
    try:
        base_folder, fingerprint, warnings = Path(reader.base.folder), reader.fingerprint(), list(reader.warnings)
        added_heads = [info.shape[0] for info in reader.added.values() if len(info.shape) == 2]
    finally:
        reader.close()
    label2id = trained_labels(delta) if head != "causal_lm" else {}
    num_labels = len(label2id) or (added_heads[0] if len(added_heads) == 1 else None)
    loaded = load_model(base_folder, head, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code,
                        num_labels=num_labels)
    apply_to_model(loaded.model, delta)
    if label2id:  # string labels as train mapped them, so eval reads the same JSONL
        loaded.model.config.label2id = dict(label2id)
        loaded.model.config.id2label = {int(v): k for k, v in label2id.items()}
    loaded.model.to(device).eval()
    tokenizer = loaded.tokenizer
    if (delta / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(delta, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(delta, loaded.model, tokenizer, fingerprint, warnings)

