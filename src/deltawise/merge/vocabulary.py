"""Vocabularies matched by token string: the output tokenizer of ``tokenizer_source``/``tokenizer:``
and, for every input, which of its rows stands for each output token.

mergekit 0.1.5's rules (mergekit/tokenizer/build.py, embed.py), followed here:

- The base tokenizer is the base model's (without ``base_model``: the first model of the recipe),
  stripped of tokens at or beyond its config's ``vocab_size`` (BPE tokenizers only).
- ``base``: the output vocabulary is the base's. ``<model>``: that model's tokenizer. ``union``:
  the base's, then every other model's tokens it lacks (plain tokens, then added tokens with their
  settings), models taken in recipe order (mergekit takes them in set order, which varies between
  runs for three or more models). Tokens named under ``tokenizer.tokens`` are added when missing.
- Output row ``i`` of a vocabulary tensor (token embedding, LM head) holds, for each model, its row
  of token ``i``'s string. A model that lacks the token gets a default row, the same for every
  model: the ``tokens:`` entry's source when given; else the row of the only model that has it;
  else the base model's row when it has it; else the mean of the rows of the models that have it;
  zeros when none has it. ``force: true`` gives every model the default row.
- ``new_rows: mean`` (a deltawise extension) gives a model that lacks a token (with no ``tokens:``
  entry) its own mean embedding instead, so that the new row changes that model's outputs the least
  (Hewitt, 2021, "Initializing new word embeddings for pretrained language models").
- ``pad_to_multiple_of``: rows past the vocabulary up to the multiple are each model's mean row.

Row rules are decided once from the tokenizers; the rows themselves are read tensor by tensor
(``deltawise.merge.aligned``), so no embedding matrix is held whole.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from deltawise.architecture import architecture_for
from deltawise.errors import InputError, RecipeError
from deltawise.io.files import TOKENIZER_FILES
from deltawise.io.resolve import resolve_model
from deltawise.merge.recipe import ModelTokenSource, Recipe, TokenEmbedding, TokenizerSection, ZeroSource

if TYPE_CHECKING:
    from deltawise.io.reader import ModelReader

# a row rule: ("model", ref, row), ("mean", [(ref, row), ...]) or ("zero",)
RowRule = tuple


@dataclass
class Vocabulary:
    """The output tokenizer and, per input model, the input row of every output token (-1: absent)."""

    tokenizer: Any  # transformers PreTrainedTokenizerFast
    tokens: list[str]  # output token strings by id
    rows: int  # output rows (the vocabulary, padded to pad_to_multiple_of)
    positions: dict[str, np.ndarray]  # model ref -> input row of each output token, -1 when absent
    defaults: dict[int, RowRule]  # output row -> the row shared by models that lack the token (or all, forced)
    forced: set[int] = field(default_factory=set)
    configured: set[int] = field(default_factory=set)  # rows with a tokens: entry
    new_rows: str = "mergekit"
    chat_template: Optional[str] = None

    @property
    def size(self) -> int:
        return len(self.tokens)

    def save(self, folder: Path) -> None:
        """The output tokenizer's files (with the recipe's chat template) into ``folder``."""
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(str(folder))


def tokenizer_settings(recipe: Recipe) -> Optional[TokenizerSection]:
    """The recipe's tokenizer section (``tokenizer:`` wins over ``tokenizer_source``, as in mergekit), or None."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    if recipe.tokenizer_source is not None:
        return TokenizerSection(source=recipe.tokenizer_source)
    return None


def load_tokenizer(folder: Path, label: str):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{label} ({folder}) holds no tokenizer files; rows are matched by token string, which needs "
                         "the tokenizers (leave out tokenizer_source and tokenizer: to merge row by row)")
    try:  # never trust_remote_code: a tokenizer's own code is not run implicitly
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot load the tokenizer of {label} ({folder}): {exc}") from None


def vocab_size(reader: "ModelReader", tokenizer) -> int:
    config = reader.config or {}
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else len(tokenizer.get_vocab())


def build_vocabulary(recipe: Recipe, readers: dict[str, "ModelReader"], refs: list[str], warnings: list[str]) -> Vocabulary:
    """The output vocabulary of ``recipe`` over models ``refs`` (recipe order; ``readers``: opened inputs)."""
    section = tokenizer_settings(recipe)
    assert section is not None
    base_ref = recipe.base_model or refs[0]
    source_folder = _model_folder(section.source, readers) if section.source not in ("base", "union") else None
    base_tok = stripped_tokenizer(readers[base_ref], base_ref)
    tokenizers = {base_ref: base_tok}
    for ref in refs:
        if ref == base_ref:
            continue
        try:
            tokenizers[ref] = load_tokenizer(readers[ref].folder, ref)
        except InputError as exc:
            warnings.append(f"{exc}; its vocabulary is taken to be {base_ref}'s")
    sizes = {ref: vocab_size(readers[ref], tokenizers.get(ref, base_tok)) for ref in refs}

    if section.source == "base":
        out = base_tok
    elif section.source == "union":
        order = [base_ref] + [ref for ref in refs if ref != base_ref and ref in tokenizers]  # the base first, as mergekit
        out = union_tokenizer(base_tok, [(ref, tokenizers[ref], sizes[ref]) for ref in order], warnings)
    else:
        out = load_tokenizer(source_folder, section.source)
    existing = set(out.get_vocab())
    for token in section.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)

    vocab = out.get_vocab()
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    positions = {}
    for ref in refs:
        model_vocab = tokenizers.get(ref, base_tok).get_vocab()
        rows = np.full(len(tokens), -1, dtype=np.int64)
        for i, token in enumerate(tokens):
            j = model_vocab.get(token, -1)
            rows[i] = j if j < sizes[ref] else -1
        positions[ref] = rows
    rows_out = len(tokens)
    if section.pad_to_multiple_of and rows_out % section.pad_to_multiple_of:
        rows_out += section.pad_to_multiple_of - rows_out % section.pad_to_multiple_of
    original = {ref: tok.get_vocab() for ref, tok in tokenizers.items()}
    defaults, forced, configured = _row_rules(section, tokens, positions, recipe.base_model, original, warnings)
    return Vocabulary(out, tokens, rows_out, positions, defaults, forced, configured, section.new_rows,
                      chat_template(recipe, tokenizers))


def _model_folder(ref: str, readers: dict[str, "ModelReader"]) -> Path:
    if ref in readers:
        return readers[ref].folder
    try:
        path = resolve_model(ref)
    except InputError as exc:
        raise InputError(f"tokenizer_source: {exc}") from None
    return path if path.is_dir() else path.parent


def stripped_tokenizer(reader: "ModelReader", label: str):
    """The model's tokenizer without the tokens at or beyond its ``vocab_size`` (rows it does not have)."""
    from tokenizers import Tokenizer

    tok = load_tokenizer(reader.folder, label)
    size = vocab_size(reader, tok)
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    data = json.loads(tok._tokenizer.to_str()) if tok.is_fast else None
    if data is None or data["model"]["type"] != "BPE":
        raise InputError(f"{label}: its tokenizer has {len(unused)} token(s) at or beyond vocab_size {size}, and only a "
                         "fast BPE tokenizer can be stripped of them")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def union_tokenizer(base_tok, models: list[tuple[str, Any, int]], warnings: list[str]):
    """The base tokenizer plus every token of ``models`` (ref, tokenizer, vocab_size) it lacks."""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ref, tok, size in models:
        decoder = tok.added_tokens_decoder
        added_strings = {info.content for info in decoder.values()}
        for token, i in tok.get_vocab().items():
            if i < size and token not in added_strings:
                plain.setdefault(token)
        for i, info in decoder.items():
            if i >= size:
                continue
            if info.content in added and added[info.content] != info:
                warnings.append(f"token {info.content!r} is added with different settings by {ref}; the first is kept")
            added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:  # a copy: the base tokenizer is used again for row lookups
        base_tok.save_pretrained(folder)
        out = AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False)
    base_vocab = base_tok.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _row_rules(section: TokenizerSection, tokens: list[str], positions: dict[str, np.ndarray], base_ref: Optional[str],
               original: dict[str, dict[str, int]], warnings: list[str]) -> tuple[dict[int, RowRule], set[int], set[int]]:
    refs = list(positions)
    present = np.stack([positions[ref] >= 0 for ref in refs])  # models x tokens
    every = present.all(axis=0)
    defaults: dict[int, RowRule] = {}
    forced, configured = set(), set()
    index = {token: i for i, token in enumerate(tokens)}
    problems = []
    for token, setting in section.tokens.items():
        i = index[token]
        configured.add(i)
        if setting.force:
            forced.add(i)
        if setting.force or not every[i]:
            try:
                defaults[i] = _configured_rule(token, i, setting, positions, original)
            except RecipeError as exc:
                problems.append(str(exc))
    if problems:
        raise RecipeError("tokenizer.tokens:\n" + "\n".join(f"- {p}" for p in problems))
    for i in np.flatnonzero(~every):
        i = int(i)
        if i in configured:
            continue
        having = [ref for k, ref in enumerate(refs) if present[k, i]]
        if len(having) == 1:
            defaults[i] = ("model", having[0], int(positions[having[0]][i]))
        elif not having:
            warnings.append(f"token {tokens[i]!r} is in no model's vocabulary; its row is zeros")
            defaults[i] = ("zero",)
        elif base_ref in having:
            defaults[i] = ("model", base_ref, int(positions[base_ref][i]))
        else:
            defaults[i] = ("mean", [(ref, int(positions[ref][i])) for ref in having])
    return defaults, forced, configured


def _configured_rule(token: str, i: int, setting: TokenEmbedding, positions: dict[str, np.ndarray],
                     original: dict[str, dict[str, int]]) -> RowRule:
    source: Union[ModelTokenSource, ZeroSource, str, None] = setting.source
    if source is None:
        raise RecipeError(f"{token!r}: give a source (a model, {{kind: model_token, ...}} or {{kind: zero}})")
    if isinstance(source, ZeroSource):
        return ("zero",)
    model = source.model if isinstance(source, ModelTokenSource) else source
    if model not in positions:
        raise RecipeError(f"{token!r}: {model} is not one of the recipe's models")
    if isinstance(source, ModelTokenSource):
        if source.token_id is not None:
            return ("model", model, source.token_id)
        row = original.get(model, {}).get(source.token)
        if row is None:
            raise RecipeError(f"{token!r}: {model} has no token {source.token!r}")
        return ("model", model, row)
    row = int(positions[model][i])
    if row < 0:
        raise RecipeError(f"{token!r}: {model} has no such token")
    return ("model", model, row)


def chat_template(recipe: Recipe, tokenizers: dict[str, Any]) -> Optional[str]:
    """The recipe's ``chat_template``: ``auto`` (the most common among the models), a template name
    (chatml, ...) or the Jinja text itself."""
    from collections import Counter

    wanted = recipe.chat_template
    if not wanted:
        return None
    if wanted == "auto":
        found = [t for t in (getattr(tok, "chat_template", None) for tok in tokenizers.values()) if isinstance(t, str)]
        return Counter(found).most_common(1)[0][0] if found else None
    if wanted in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[wanted]
    if len(wanted) < 20 or "{" not in wanted:
        raise RecipeError(f"chat_template {wanted!r} is neither a template name ({', '.join(NAMED_TEMPLATES)}, auto) "
                          "nor a Jinja template")
    return wanted


# the common formats by name, as mergekit names them (the same text)
NAMED_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}\n"),
    "llama3": ("{% set loop_messages = messages %}\n{% for message in loop_messages %}\n{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}\n{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n"
               "{{ content }}\n{% endfor %}\n{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n"),
}


# the files that decide which token each row stands for
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")


def _vocabulary_bytes(folder: Path) -> Optional[tuple[bytes, ...]]:
    found = [folder / name for name in VOCABULARY_FILES]
    if not any(p.is_file() for p in found):
        return None
    return tuple(p.read_bytes() if p.is_file() else b"" for p in found)


def vocabulary_problems(plan) -> list[str]:
    """Without a tokenizer section: models whose tokenizers put different tokens on a merged row.

    Merging such rows would average unrelated tokens' embeddings; matching them needs
    ``tokenizer_source``. Models without tokenizer files cannot be checked (mergekit, too, takes them
    to share the base's vocabulary)."""
    template = plan.template
    rows = [t.out.shape[0] for t in plan.merged
            if t.out.shape and architecture_for(template.config).is_vocabulary(t.name)]
    if not rows:
        return []
    mine = _vocabulary_bytes(template.reader.folder)
    if mine is None:
        return []
    models = {m.ref: m for m in plan.inputs + ([plan.base] if plan.base else []) if m.ref != template.ref}
    problems = []
    template_tokens = None
    for ref, model in models.items():
        theirs = _vocabulary_bytes(model.reader.folder)
        if theirs is None or theirs == mine:
            continue
        if template_tokens is None:
            template_tokens = _tokens_by_row(load_tokenizer(template.reader.folder, template.ref), max(rows))
        tokens = _tokens_by_row(load_tokenizer(model.reader.folder, ref), max(rows))
        differ = [i for i in range(max(rows)) if tokens.get(i) != template_tokens.get(i)
                  and i in tokens and i in template_tokens]
        if differ:
            i = differ[0]
            problems.append(f"{ref} and {template.ref} have different tokens on {len(differ)} merged row(s) (row {i}: "
                            f"{tokens[i]!r} vs {template_tokens[i]!r}); merging them row by row would mix unrelated "
                            "tokens: set tokenizer_source (union, base or a model) so rows are matched by token")
    return problems


def _tokens_by_row(tokenizer, rows: int) -> dict[int, str]:
    return {i: token for token, i in tokenizer.get_vocab().items() if i < rows}
