"""Fingerprint every output of a fixed set of deltawise commands, to prove that a refactor changed no result.

    PYTHONPATH=<checkout>/src python benchmarks/fingerprint.py --work DIR --json OUT.json
    python benchmarks/fingerprint.py --compare BEFORE.json AFTER.json

The first form builds tiny deterministic inputs in DIR (a Llama with hidden 32 and 2 layers, its fine-tunes
as base + seeded noise in float32 and in bfloat16, a BERT classifier and its fine-tunes, small data files),
runs every command of COMMANDS below through the CLI (``python -m deltawise ...`` as subprocesses that inherit
PYTHONPATH, so the checkout under test is the one that runs), and writes OUT.json: for every step the exit
status, the sha256 of each file the step created or changed, and the loss sequence of every
training_log.json it wrote.

Every run happens at the same absolute path (RUN_ROOT, under a lock; moved to DIR at the end), because deltawise
hashes files that hold resolved paths (a delta's fingerprint is the sha256 of its delta.json, which names its base).
A file's sha256 is of its raw bytes, unless it holds run-specific parts; then it is of the content with them taken out:
- JSON files with a key of VOLATILE_KEYS (at any depth: timings, memory, creation times) or the run folder's path:
  parsed, those keys removed, the path replaced by ``<WORK>``, dumped canonically;
- safetensors files: the header dumped canonically (the safetensors library writes ``__metadata__`` in a random key
  order), its metadata cleaned like JSON, plus the raw tensor bytes;
- any other file holding the path: its bytes with the path replaced.
``how`` in the output says which applied to each file.

The second form prints what differs (step, file, before/after hash) and exits 1, or exits 0 when all is equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# What runs. Paths are relative to the work folder (every command runs there). Edit here when a flag is renamed.
# ---------------------------------------------------------------------------------------------------------------

LM = ["models/lm/ft1", "models/lm/ft2", "models/lm/ft3"]  # float32 fine-tunes of models/lm/base
CLS = ["models/cls/ft1", "models/cls/ft2", "models/cls/ft3"]  # BERT classifier fine-tunes of models/cls/base


def recipe(method: str, models: Iterable[str], base: str | None = "models/lm/base", params: dict | None = None,
           per_model: dict[str, list[Any]] | None = None, **top: Any) -> dict[str, Any]:
    """A merge recipe; ``per_model`` maps a parameter to one value per model."""
    models = list(models)
    entries = []
    for i, model in enumerate(models):
        entry: dict[str, Any] = {"model": model}
        if per_model:
            entry["parameters"] = {name: values[i] for name, values in per_model.items()}
        entries.append(entry)
    out: dict[str, Any] = {"merge_method": method, "models": entries, **top}
    if base is not None:
        out["base_model"] = base
    if params:
        out["parameters"] = params
    return out


# One recipe per method with default parameters, plus a non-default one for every sparsifying method.
RECIPES: dict[str, dict[str, Any]] = {
    "linear": recipe("linear", LM, base=None),
    "linear-weights": recipe("linear", LM, base=None, per_model={"weight": [0.5, 0.3, 0.2]}, params={"normalize": False}),
    "linear-to-bf16": recipe("linear", LM, base=None, dtype="bfloat16"),
    "task_arithmetic": recipe("task_arithmetic", LM),
    "task_arithmetic-lambda": recipe("task_arithmetic", LM, params={"lambda": 0.7}, per_model={"weight": [1.0, 0.5, 0.25]}),
    "ties": recipe("ties", LM),
    "ties-sparse": recipe("ties", LM, params={"granularity": "global", "lambda": 0.8}, per_model={"density": [0.3, 0.3, 0.5]}),
    "dare_linear": recipe("dare_linear", LM),
    "dare_linear-sparse": recipe("dare_linear", LM, per_model={"density": [0.3, 0.3, 0.3]}, seed=7),
    "dare_ties": recipe("dare_ties", LM),
    "dare_ties-sparse": recipe("dare_ties", LM, per_model={"density": [0.3, 0.4, 0.5]},
                               params={"rescale_mode": "inverse_density"}, seed=11),
    "breadcrumbs": recipe("breadcrumbs", LM),
    "breadcrumbs-sparse": recipe("breadcrumbs", LM, per_model={"density": [0.5, 0.5, 0.5], "gamma": [0.05, 0.05, 0.05]}),
    "breadcrumbs_ties": recipe("breadcrumbs_ties", LM),
    "breadcrumbs_ties-sparse": recipe("breadcrumbs_ties", LM, per_model={"density": [0.4, 0.4, 0.4]},
                                      params={"granularity": "row"}),
    "consensus": recipe("consensus", LM),
    "consensus-ties": recipe("consensus", LM, params={"multi_task": "ties", "k": 1}, per_model={"density": [0.3, 0.3, 0.3]}),
    "pcb": recipe("pcb", LM),
    "pcb-tensor": recipe("pcb", LM, params={"ratio": 0.3, "granularity": "tensor"}),
    "model_stock": recipe("model_stock", LM),
    "model_stock-filter_wise": recipe("model_stock", LM, params={"filter_wise": True}),
    "slerp": recipe("slerp", LM[:1], params={"t": 0.3}),
    "weight_matching": recipe("weight_matching", LM[:2], base=None, seed=3),
    "opcm-1": recipe("opcm", LM[:2], params={"state": "out/state/opcm"}),
    "opcm-2": recipe("opcm", LM[2:], params={"state": "out/state/opcm"}),
    "continual_average-1": recipe("continual_average", LM[:2], params={"state": "out/state/continual_average"}),
    "continual_average-2": recipe("continual_average", LM[2:], params={"state": "out/state/continual_average"}),
    "continual_task_arithmetic-1": recipe("continual_task_arithmetic", LM[:2], params={"state": "out/state/cta"}),
    "continual_task_arithmetic-2": recipe("continual_task_arithmetic", LM[2:], params={"state": "out/state/cta"}),
    # data-driven: statistics from the fisher/gram steps below
    "fisher": recipe("fisher", CLS[:2], base=None,
                     per_model={"fisher": ["out/fisher/cls-ft1.safetensors", "out/fisher/cls-ft2.safetensors"]}),
    "regmean": recipe("regmean", CLS[:2], base=None,
                      per_model={"gram": ["out/gram/cls-ft1.safetensors", "out/gram/cls-ft2.safetensors"]}),
    # delta folder, PEFT LoRA adapter and ComPEFT delta as inputs (from the extract/compress steps below)
    "task_arithmetic-deltas": recipe("task_arithmetic",
                                     ["out/extract/ft1-delta", "out/extract/ft2-lora", "out/compress/compeft"]),
    "ties-deltas": recipe("ties", ["out/extract/ft1-delta", "out/extract/ft2-lora", "out/extract/ft3-delta"],
                          per_model={"density": [0.5, 0.5, 0.5]}),
    # the retention-budget search (merge --retain)
    "budget": recipe("task_arithmetic", LM[:1]),
}
# The same merges on the bfloat16 set (the fused kernels and the bf16 casts take other paths than float32).
BF16_RECIPES = ["linear", "linear-weights", "task_arithmetic", "task_arithmetic-lambda", "ties-sparse", "dare_ties-sparse",
                "breadcrumbs-sparse", "model_stock", "slerp"]
for _name in BF16_RECIPES:
    RECIPES[f"{_name}-bf16"] = json.loads(json.dumps(RECIPES[_name]).replace('"models/lm/', '"models/lm16/'))

PLAIN_MERGES = [n for n in RECIPES if n not in ("fisher", "regmean", "task_arithmetic-deltas", "ties-deltas", "budget")
                and not re.match(r"(opcm|continual_\w+)-\d$", n)]
CONTINUAL_MERGES = [n for n in RECIPES if re.match(r"(opcm|continual_\w+)-\d$", n)]
TRAIN_METHODS = ["full", "lora", "dora", "pissa", "lora_fa", "fourierft", "miss", "randlora", "hft", "lift", "sorsa", "loldu",
                 "kasa"]
TRAIN_COMMON = "--max-steps 3 --batch-size 4 --max-length 32 --lr 1e-3 --seed 0 -q"
# where a method's default does not fit a hidden size of 32 (PEFT refuses it)
TRAIN_OPTIONS = {"fourierft": "--n-frequency 64", "miss": "--rank 8"}
EVAL_COMMON = "--max-length 32 --batch-size 4 -q"


def _merge(name: str, *extra: str) -> tuple[str, str]:
    return f"merge/{name}", " ".join([f"merge recipes/{name}.yaml out/merge/{name} -q", *extra])


# (label, arguments after `python -m deltawise`), run in this order: later steps read earlier outputs.
COMMANDS: list[tuple[str, str]] = [
    *[_merge(n) for n in PLAIN_MERGES],
    ("merge/task_arithmetic-sharded", "merge recipes/task_arithmetic.yaml out/merge/task_arithmetic-sharded --shard-size 40KB "
                                      "--threads 1 -q"),
    *[_merge(n) for n in CONTINUAL_MERGES],
    ("extract/ft1-delta", "extract models/lm/ft1 --base models/lm/base -o out/extract/ft1-delta "
                          "--report out/extract/ft1-delta.json -q"),
    ("extract/ft2-delta", "extract models/lm/ft2 --base models/lm/base -o out/extract/ft2-delta -q"),
    ("extract/ft3-delta", "extract models/lm/ft3 --base models/lm/base -o out/extract/ft3-delta -q"),
    ("extract/ft1-delta-bf16", "extract models/lm16/ft1 --base models/lm16/base -o out/extract/ft1-delta-bf16 -q"),
    ("extract/ft2-lora", "extract models/lm/ft2 --base models/lm/base -o out/extract/ft2-lora --lora --rank 4 "
                         "--report out/extract/ft2-lora.json -q"),
    ("apply/delta-half", "apply out/extract/ft1-delta --base models/lm/base -o out/apply/delta-half --scale 0.5 -q"),
    ("apply/lora", "apply out/extract/ft2-lora --base models/lm/base -o out/apply/lora --report out/apply/lora.json -q"),
    ("compress/compeft", "compress out/extract/ft1-delta --method compeft -o out/compress/compeft "
                         "--report out/compress/compeft.json -q"),
    ("compress/topk", "compress out/extract/ft1-delta --method topk --density 0.2 -o out/compress/topk -q"),
    ("compress/tall", "compress out/extract/ft1-delta out/extract/ft2-delta out/extract/ft3-delta --method tall --lam 0.4 "
                      "-o out/compress/tall --report out/compress/tall.json -q"),
    ("apply/tall-task1", "apply out/compress/tall --base models/lm/base --task 1 -o out/apply/tall-task1 -q"),
    ("apply/compeft", "apply out/compress/compeft --base models/lm/base -o out/apply/compeft -q"),
    _merge("task_arithmetic-deltas"),
    _merge("ties-deltas"),
    *[(f"train/{m}", f"train models/lm/base --data data/lm.txt -o out/train/{m} --method {m} "
                     f"{TRAIN_OPTIONS.get(m, '')} {TRAIN_COMMON}") for m in TRAIN_METHODS],
    ("train/lora-prompt-response", f"train models/lm/base --data data/pr.jsonl -o out/train/lora-pr --method lora --rank 4 "
                                   f"{TRAIN_COMMON}"),
    ("train/full-cpt-replay", f"train models/lm/base --data data/lm.txt -o out/train/full-cpt --method full --schedule cpt "
                              f"--warmup 1 --replay data/tgt.txt --replay-fraction 0.25 {TRAIN_COMMON}"),
    ("train/classification-lora", f"train models/cls/base --data data/cls.jsonl -o out/train/cls-lora --task classification "
                                  f"--method lora --rank 4 {TRAIN_COMMON}"),
    ("bam", "bam models/lm/base --data data/bam.txt -o out/bam -k 2 -r 1 --method full --max-steps 2 --batch-size 2 "
            "--max-length 32 --lr 1e-3 --warmup 0 -q"),
    ("fisher/cls-ft1", "fisher models/cls/ft1 --data data/cls.jsonl -o out/fisher/cls-ft1.safetensors --max-length 32 -q"),
    ("fisher/cls-ft2", "fisher models/cls/ft2 --data data/cls.jsonl -o out/fisher/cls-ft2.safetensors --max-length 32 -q"),
    ("fisher/lm-ft1", "fisher models/lm/ft1 --data data/lm.txt -o out/fisher/lm-ft1.safetensors --max-length 32 -q"),
    ("gram/cls-ft1", "gram models/cls/ft1 --data data/cls.jsonl -o out/gram/cls-ft1.safetensors --max-length 32 -q"),
    ("gram/cls-ft2", "gram models/cls/ft2 --data data/cls.jsonl -o out/gram/cls-ft2.safetensors --max-length 32 -q"),
    _merge("fisher"),
    _merge("regmean"),
    ("soup", f"soup {' '.join(CLS)} --data data/cls.jsonl -o out/soup --max-length 32 -q"),
    ("atlas", "atlas models/cls/base models/cls/ft1 models/cls/ft2 --data data/cls.jsonl -o out/atlas --steps 3 --batch-size 4 "
              "--max-length 32 -q"),
    ("merge/budget", "merge recipes/budget.yaml out/merge/budget --retain data/src.jsonl:0.5 --target data/tgt.jsonl "
                     "--search-param lambda=0.5,1.0 --most-retentive --eval-max-length 32 --threads 1 -q"),
    ("eval/lm-base", f"eval models/lm/base --source data/src.jsonl --source data/choice.jsonl --target data/tgt.jsonl "
                     f"-o out/eval/lm-base.json {EVAL_COMMON}"),
    ("eval/lm-ft1", f"eval models/lm/ft1 --source data/src.jsonl --source data/choice.jsonl --target data/tgt.jsonl "
                    f"--baseline out/eval/lm-base.json -o out/eval/lm-ft1.json {EVAL_COMMON}"),
    ("eval/cls-ft1", f"eval models/cls/ft1 --target data/cls.jsonl -o out/eval/cls-ft1.json {EVAL_COMMON}"),
    ("analyze/weights", "analyze weights models/lm/base models/lm/ft1 models/lm/ft2 -o out/analyze/weights.json -q"),
    ("analyze/interpolate", "analyze interpolate models/lm/base models/lm/ft1 --data data/lm.txt -o out/analyze/interpolate.json "
                            "--points 3 --max-length 32 -q"),
]

OUTPUT_GROUPS = ["merge", "state", "extract", "apply", "compress", "train", "fisher", "gram", "eval", "analyze"]

# JSON keys (at any depth, also in safetensors __metadata__) that hold wall times, memory or creation times.
VOLATILE_KEYS = ["seconds", "created", "tokens_per_s", "peak_rss_mb", "rss_mb"]
# Keys whose values deltawise itself does not reproduce: an input's "fingerprint" hashes its raw safetensors header, and
# the safetensors library writes __metadata__ in a random key order in each process, so the fingerprints of delta folders
# and fisher/gram files (several metadata keys) change from run to run. Replaced by UNSTABLE (also in merge cards).
UNSTABLE_KEYS = ["fingerprint"]
UNSTABLE = "<unstable>"
CARD_FINGERPRINT = re.compile(r"`[0-9a-f]{16}…`")  # the fingerprint column of a merge's README.md

# Files in the work folder that no step's fingerprint includes: our own logs and the HF cache of the subprocesses.
IGNORED_DIRS = ("logs", ".cache")
WORK_PLACEHOLDER = "<WORK>"
# Where every run happens before its folder is moved to --work (see run_in_fixed_place).
RUN_ROOT = Path("/tmp/deltawise-fingerprint-run")
# JSON files up to this size are also stored (cleaned), so that --compare can say which keys differ.
JSON_KEPT_BYTES = 16_000

# ---------------------------------------------------------------------------------------------------------------
# Inputs: built here with torch/transformers/tokenizers only (never deltawise), so they are the same for any checkout.
# ---------------------------------------------------------------------------------------------------------------

DOCS = [
    "Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.",
    "Complex is better than complicated.", "Flat is better than nested.", "Sparse is better than dense.",
    "Readability counts, and errors should never pass silently.", "Now is better than never, although never is often better.",
]
CLS_TEXTS = [("a good day in the sun", 2), ("a bad day in the rain", 0), ("the food was fine", 1), ("awful food and cold tea", 0),
             ("a nice play with friends", 2), ("a poor play and a long night", 0), ("great song", 2), ("a plain song", 1),
             ("warm sun and good food", 2), ("the tea was plain", 1), ("sad news today", 0), ("an ordinary walk", 1)]


def _train_bpe(texts: list[str], vocab_size: int, folder: Path):
    """A whitespace-split BPE tokenizer with <unk>/<s>/</s>/<pad> that prepends <s>, as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def _wordpiece_tokenizer(texts: list[str], folder: Path):
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP]) whose vocabulary is every word and character of ``texts``.

    Not trained with the tokenizers WordPiece trainer: that one gives another vocabulary from run to run."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))})
    chars = sorted({c for w in words for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *(w for w in words if len(w) > 1)]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return fast


def _perturb(src: Path, dst: Path, seed: int, scale: float, dtype=None) -> None:
    """Copy a model folder, adding seeded Gaussian noise to every floating tensor (and casting to ``dtype``)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(dst.glob("*.safetensors")):
        state = load_file(f)
        for name in sorted(state):
            value = state[name]
            if value.is_floating_point():
                noisy = value + scale * torch.randn(value.shape, generator=gen, dtype=value.dtype) if scale else value
                state[name] = noisy.to(dtype or value.dtype).contiguous()
        save_file(state, f, metadata={"format": "pt"})


def build_inputs(work: Path) -> None:
    """Models and data the commands read (see the module docstring)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    data = work / "data"
    data.mkdir(parents=True)
    (data / "lm.txt").write_text("\n%\n".join(DOCS) + "\n")
    target_docs = [" ".join(reversed(d.split())) for d in DOCS]
    (data / "tgt.txt").write_text("\n%\n".join(target_docs) + "\n")
    (data / "src.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (data / "tgt.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in target_docs))
    split = [(d.split(" is ")[0] + " is", d.split(" is ", 1)[-1], " is " in d) for d in DOCS]  # (prompt, response, a real split)
    (data / "pr.jsonl").write_text("".join(json.dumps({"prompt": p, "response": " " + r}) + "\n" for p, r, _ in split))
    (data / "choice.jsonl").write_text("".join(
        json.dumps({"question": p, "choices": [r, "worse than nothing."], "answer": 0}) + "\n" for p, r, real in split if real))
    (data / "bam.txt").write_text("\n%\n".join(f"{d} Item {i}." for i, d in enumerate(DOCS + DOCS[:4])) + "\n")
    (data / "cls.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in CLS_TEXTS))

    lm = work / "models" / "lm"
    tok = _train_bpe(DOCS * 4 + target_docs, 96, lm / "base")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=len(tok), max_position_embeddings=64, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(lm / "base")
    lm16 = work / "models" / "lm16"
    _perturb(lm / "base", lm16 / "base", 0, 0.0, torch.bfloat16)
    for i in (1, 2, 3):
        _perturb(lm / "base", lm / f"ft{i}", i, 0.01)
        _perturb(lm / "base", lm16 / f"ft{i}", i, 0.01, torch.bfloat16)  # the float32 noise, rounded: a bf16 fine-tune

    cls = work / "models" / "cls"
    btok = _wordpiece_tokenizer([t for t, _ in CLS_TEXTS], cls / "base")
    bcfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=len(btok),
                      max_position_embeddings=64, num_labels=3, pad_token_id=btok.pad_token_id)
    torch.manual_seed(0)
    BertForSequenceClassification(bcfg).save_pretrained(cls / "base")
    for i in (1, 2, 3):
        _perturb(cls / "base", cls / f"ft{i}", i, 0.05)

    for group in OUTPUT_GROUPS:  # the commands create their output, not its parent folder
        (work / "out" / group).mkdir(parents=True)
    recipes = work / "recipes"
    recipes.mkdir()
    for name, content in RECIPES.items():
        (recipes / f"{name}.yaml").write_text(json.dumps(content, indent=1) + "\n")  # JSON is YAML


# ---------------------------------------------------------------------------------------------------------------
# Hashing with run-specific noise removed
# ---------------------------------------------------------------------------------------------------------------


def _clean(value: Any, work: str) -> Any:
    """JSON value with volatile keys dropped and the work folder's path replaced, recursively."""
    if isinstance(value, dict):
        return {k: UNSTABLE if k in UNSTABLE_KEYS else _clean(v, work) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_clean(v, work) for v in value]
    if isinstance(value, str):
        return _clean_string(value, work)
    return value


def _clean_string(text: str, work: str) -> Any:
    text = text.replace(work, WORK_PLACEHOLDER)
    if text[:1] in "{[":  # safetensors metadata values are strings, often JSON
        try:
            return _clean(json.loads(text), work)
        except ValueError:
            pass
    return text


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def file_digest(path: Path, work: str) -> dict[str, str]:
    """sha256 of a file; of its content with the run-specific parts removed where it has any (``how`` says which)."""
    raw = path.read_bytes()
    has_path = work.encode() in raw
    if path.suffix == ".safetensors" and len(raw) >= 8:
        (n,) = struct.unpack("<Q", raw[:8])
        try:
            header = json.loads(raw[8 : 8 + n])
        except ValueError:
            header = None
        if isinstance(header, dict):
            # Always canonical: safetensors writes __metadata__ from a hash map, in another key order in every process.
            # Tensor names, dtypes, shapes and data offsets are all in the canonical header, so layout changes still show.
            if "__metadata__" in header:
                header["__metadata__"] = _clean(header["__metadata__"], work)
            digest = hashlib.sha256(_canonical(header) + raw[8 + n :]).hexdigest()
            return {"sha256": digest, "how": "safetensors: canonical header (metadata cleaned) + tensor bytes"}
    if path.suffix == ".json":
        try:
            value = json.loads(raw.decode())
        except ValueError:
            value = None
        if value is not None:
            cleaned = _clean(value, work)
            kept = {"json": cleaned} if len(raw) <= JSON_KEPT_BYTES else {}  # lets --compare name the keys that differ
            if has_path or cleaned != value:
                return {"sha256": hashlib.sha256(_canonical(cleaned)).hexdigest(), "how": "json: canonical, cleaned", **kept}
            return {"sha256": hashlib.sha256(raw).hexdigest(), "how": "bytes", **kept}
    if path.name == "README.md" and CARD_FINGERPRINT.search(raw.decode(errors="replace")):
        text = CARD_FINGERPRINT.sub(UNSTABLE, raw.decode(errors="replace")).replace(work, WORK_PLACEHOLDER)
        return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "how": "text, fingerprints and work path replaced"}
    if has_path:
        cleaned_bytes = raw.replace(work.encode(), WORK_PLACEHOLDER.encode())
        return {"sha256": hashlib.sha256(cleaned_bytes).hexdigest(), "how": "bytes, work path replaced"}
    return {"sha256": hashlib.sha256(raw).hexdigest(), "how": "bytes"}


def training_losses(path: Path) -> list[Any] | None:
    """The ``loss`` of every entry of a training_log.json, in order."""
    try:
        log = json.loads(path.read_text())
    except ValueError:
        return None
    entries = log if isinstance(log, list) else log.get("log", []) if isinstance(log, dict) else []
    return [e["loss"] for e in entries if isinstance(e, dict) and "loss" in e]


def snapshot(work: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under the work folder except IGNORED_DIRS, by relative path."""
    files = {}
    for root, dirs, names in os.walk(work):
        rel_root = Path(root).relative_to(work)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in IGNORED_DIRS]
        dirs.sort()
        for name in names:
            st = (Path(root) / name).stat()
            files[str(rel_root / name)] = (st.st_size, st.st_mtime_ns)
    return files


def fingerprint_changes(work: Path, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Digests of the files a step created or changed, the files it removed, and its training losses."""
    work_str = str(work)
    changed = sorted(p for p, stat in after.items() if before.get(p) != stat)
    record: dict[str, Any] = {"files": {p: file_digest(work / p, work_str) for p in changed}}
    removed = sorted(set(before) - set(after))
    if removed:
        record["removed"] = removed
    losses = {p: training_losses(work / p) for p in changed if Path(p).name == "training_log.json"}
    if losses:
        record["losses"] = losses
    return record


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def cli_env(work: Path) -> dict[str, str]:
    """The subprocesses' environment: deterministic and offline, on the CPU, one thread (tiny models: faster too)."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
        "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(work / ".cache" / "hf"), "WANDB_DISABLED": "true", "COLUMNS": "400", "TERM": "dumb", "NO_COLOR": "1",
    })
    return env


def registered_methods(env: dict[str, str], work: Path) -> list[str]:
    """Method names from `deltawise methods` (first column of its table; COLUMNS is wide so no name is cut)."""
    res = subprocess.run([sys.executable, "-m", "deltawise", "methods"], cwd=work, env=env, capture_output=True, text=True,
                         check=False)
    names = []
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)]
        if len(cells) > 2 and re.fullmatch(r"[a-z][a-z0-9_]*", cells[1]) and cells[1] != "method":
            names.append(cells[1])
    return sorted(set(names))


def run_in_fixed_place(results: Path, run_root: Path, only: str | None) -> dict[str, Any]:
    """Run everything in ``run_root`` (one run at a time: a lock file beside it), then move it all to ``results``.

    deltawise stores some resolved paths and hashes of files that hold them (a delta's fingerprint is the sha256 of
    its delta.json, which names its base's absolute path): a hash cannot be cleaned afterwards, so every run has
    to happen at the same absolute path for its outputs to compare equal."""
    import fcntl

    results.mkdir(parents=True, exist_ok=True)
    if any(results.iterdir()):
        raise SystemExit(f"{results} is not empty: give a new or empty folder")
    run_root.parent.mkdir(parents=True, exist_ok=True)
    with open(run_root.parent / f"{run_root.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another fingerprint run in {run_root}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if run_root.exists():  # left by an interrupted run (we hold the lock: nobody else is using it)
            shutil.rmtree(run_root)
        run_root.mkdir()
        result = run_all(run_root, only)
        result["results_moved_to"] = str(results.resolve())
        for entry in sorted(run_root.iterdir()):
            shutil.move(str(entry), str(results / entry.name))
        run_root.rmdir()
    return result


def run_all(work: Path, only: str | None) -> dict[str, Any]:
    """Build the inputs in the empty folder ``work``, run COMMANDS there and fingerprint what each step wrote."""
    work = work.resolve()
    env = cli_env(work)
    logs = work / "logs"
    logs.mkdir()
    result: dict[str, Any] = {"format": 1, "python": sys.executable, "pythonpath": os.environ.get("PYTHONPATH", ""),
                              "ran_in": str(work), "volatile_keys": VOLATILE_KEYS, "unstable_keys": UNSTABLE_KEYS, "steps": {}}

    started = time.time()
    before = snapshot(work)
    build_inputs(work)
    result["steps"]["setup"] = {"rc": 0, **fingerprint_changes(work, before, snapshot(work))}

    methods = registered_methods(env, work)
    covered = {r["merge_method"] for r in RECIPES.values()}
    result["methods"] = methods
    result["methods_without_recipe"] = sorted(set(methods) - covered)
    if result["methods_without_recipe"]:
        print(f"warning: no recipe for {', '.join(result['methods_without_recipe'])}", file=sys.stderr)
    if not methods:
        print("warning: could not read the method list from `deltawise methods`", file=sys.stderr)

    for label, args in COMMANDS:
        if only and not re.search(only, label):
            continue
        argv = shlex.split(args)
        before = snapshot(work)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "deltawise", *argv], cwd=work, env=env, capture_output=True, text=True,
                              check=False)
        seconds = time.time() - t0
        log_name = label.replace("/", "__")
        (logs / f"{log_name}.out").write_text(proc.stdout)
        (logs / f"{log_name}.err").write_text(proc.stderr)
        step = {"argv": argv, "rc": proc.returncode, **fingerprint_changes(work, before, snapshot(work)),
                "wall_s": round(seconds, 1)}
        if proc.returncode != 0:
            step["stderr_tail"] = proc.stderr[-2000:]
        result["steps"][label] = step
        status = "ok" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
        print(f"{label:<40} {status:<14} {len(step['files']):>3} files {seconds:6.1f} s", flush=True)
    result["total_s"] = round(time.time() - started, 1)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------------------------


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, file or field, before, after) for everything that differs; hashes shortened to 16 hex digits."""
    rows: list[tuple[str, str, str, str]] = []

    def short(v: Any) -> str:
        return "-" if v is None else str(v)[:16] if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) else str(v)

    if a.get("methods") != b.get("methods"):
        rows.append(("(deltawise methods)", "method list", ",".join(a.get("methods", [])), ",".join(b.get("methods", []))))
    steps_a, steps_b = a.get("steps", {}), b.get("steps", {})
    for label in list(steps_a) + [l for l in steps_b if l not in steps_a]:
        sa, sb = steps_a.get(label), steps_b.get(label)
        if sa is None or sb is None:
            rows.append((label, "(step)", "ran" if sa else "-", "ran" if sb else "-"))
            continue
        if sa.get("rc") != sb.get("rc"):
            rows.append((label, "(exit status)", str(sa.get("rc")), str(sb.get("rc"))))
        fa, fb = sa.get("files", {}), sb.get("files", {})
        for name in sorted(set(fa) | set(fb)):
            da, db = fa.get(name) or {}, fb.get(name) or {}
            if da.get("sha256") != db.get("sha256"):
                rows.append((label, name, short(da.get("sha256")), short(db.get("sha256"))))
                if "json" in da and "json" in db:
                    rows.extend((label, f"  {key}", va, vb) for key, va, vb in json_differences(da["json"], db["json"]))
        if sa.get("removed") != sb.get("removed"):
            rows.append((label, "(removed files)", str(sa.get("removed", [])), str(sb.get("removed", []))))
        la, lb = sa.get("losses", {}), sb.get("losses", {})
        for name in sorted(set(la) | set(lb)):
            if la.get(name) != lb.get(name):
                rows.append((label, f"{name}: losses", str(la.get(name)), str(lb.get(name))))
    return rows


def json_differences(a: Any, b: Any, where: str = "", limit: int = 8) -> list[tuple[str, str, str]]:
    """(key path, before, after) of the first ``limit`` leaves that differ between two JSON values."""
    out: list[tuple[str, str, str]] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if len(out) >= limit or x == y:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for key in list(x) + [k for k in y if k not in x]:
                walk(x.get(key, "<absent>"), y.get(key, "<absent>"), f"{path}.{key}" if path else str(key))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        else:
            out.append((path or "(whole file)", json.dumps(x)[:60], json.dumps(y)[:60]))

    walk(a, b, where)
    if len(out) >= limit:
        out.append(("...", "", ""))
    return out


def compare(path_a: Path, path_b: Path) -> int:
    a, b = json.loads(path_a.read_text()), json.loads(path_b.read_text())
    rows = differences(a, b)
    n_files = sum(len(s.get("files", {})) for s in a.get("steps", {}).values())
    failed_in_both = [label for label, step in a.get("steps", {}).items()
                      if step.get("rc") and b.get("steps", {}).get(label, {}).get("rc")]
    if failed_in_both:  # equal, but nothing was checked there
        print(f"warning: failed in both runs: {', '.join(failed_in_both)}")
    if not rows:
        print(f"identical: {len(a.get('steps', {}))} steps, {n_files} files ({path_a} vs {path_b})")
        return 0
    widths = [max(len(r[i]) for r in rows + [("step", "file", "before", "after")]) for i in range(4)]
    widths = [min(w, 70) for w in widths]
    print("  ".join(h.ljust(w) for h, w in zip(("step", "file", "before", "after"), widths)))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    steps = sorted({r[0] for r in rows})
    print(f"\n{len(rows)} difference(s) in {len(steps)} step(s) ({path_a} vs {path_b})")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="new or empty folder that receives the inputs, outputs and logs")
    parser.add_argument("--run-root", type=Path, default=RUN_ROOT,
                        help=f"where the commands run, the same for every run (default {RUN_ROOT}); moved to --work at the end")
    parser.add_argument("--json", type=Path, help="fingerprint file to write")
    parser.add_argument("--only", help="run only the steps whose label matches this regular expression (for debugging the table)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="compare two fingerprint files")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.work or not args.json:
        parser.error("--work and --json are needed (or --compare A B)")
    result = run_in_fixed_place(args.work, args.run_root, args.only)
    args.json.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    failed = [label for label, step in result["steps"].items() if step.get("rc")]
    failures = f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""
    print(f"wrote {args.json}: {len(result['steps'])} steps in {result['total_s']} s{failures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
