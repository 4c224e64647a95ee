"""Vocabularies matched by token string (``tokenizer_source``, ``tokenizer:``): the same recipe run
through mergekit 0.1.5 and deltawise gives the same tokenizer and, token by token, the same
embedding and LM head rows; a hand-computed row rule; and the refusal to merge rows that stand for
different tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_mergekit_compat import assert_same_tensors, load_folder, run_deltawise, run_mergekit, write_recipe
from tiny_models import save_tiny_llama

from deltawise.errors import RecipeError
from deltawise.merge import merge as deltawise_merge

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "merge the weights of two models", "tokens and rows"] * 4
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
ADDED = {"<|shared|>", "<|only_a|>", "<|only_b|>", "apple", "<|extra|>"}


def _add_tokens(src: Path, dst: Path, tokens: list[str], special: bool, seed: int) -> Path:
    """A copy of model ``src`` with ``tokens`` added to its tokenizer and new random rows (and a nudge to
    every tensor, so that it is a different model)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    if special:
        tok.add_special_tokens({"additional_special_tokens": tokens})
    else:
        tok.add_tokens(tokens)
    tok.save_pretrained(dst)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(src / "model.safetensors")
    for name, value in state.items():
        value = value + 0.01 * torch.randn(value.shape, generator=gen)
        if name in VOCAB_TENSORS:
            value = torch.cat([value, torch.randn((len(tok) - value.shape[0], value.shape[1]), generator=gen)])
        state[name] = value.contiguous()
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = len(tok)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory) -> dict[str, Path]:
    """A base and two fine-tunes that each add tokens: one shared (in a different order), one their own."""
    root = tmp_path_factory.mktemp("vocab")
    base = save_tiny_llama(root / "base", TEXTS, vocab=64, hidden=16, layers=2, heads=2)
    a = _add_tokens(base, root / "a", ["<|shared|>", "<|only_a|>", "apple"], special=False, seed=1)
    b = _add_tokens(base, root / "b", ["<|only_b|>", "<|shared|>"], special=True, seed=2)
    return {"base": base, "a": a, "b": b}


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _compare_token_by_token(theirs_folder: Path, ours_folder: Path) -> None:
    """The same tokens, config vocab_size and, for every token, the same row of each vocabulary tensor;
    every other tensor equal. Tokens are matched by string: mergekit numbers the tokens it adds in
    the order of a Python set of models, which changes from run to run (deltawise: recipe order);
    the base vocabulary's ids must agree."""
    theirs_vocab, ours_vocab = _vocab(theirs_folder), _vocab(ours_folder)
    assert set(ours_vocab) == set(theirs_vocab)
    theirs, ours = load_folder(theirs_folder), load_folder(ours_folder)
    others = [n for n in theirs if n not in VOCAB_TENSORS]
    assert_same_tensors({n: theirs[n] for n in others}, {n: ours[n] for n in others if n in ours}, label="other tensors")
    for name in VOCAB_TENSORS:
        assert ours[name].shape == theirs[name].shape, name
        for token, i in theirs_vocab.items():
            assert torch.allclose(ours[name][ours_vocab[token]], theirs[name][i], atol=1e-6, rtol=1e-5), (name, token)
        for row in range(len(theirs_vocab), theirs[name].shape[0]):  # padding
            assert torch.allclose(ours[name][row], theirs[name][row], atol=1e-6, rtol=1e-5), (name, row)
    base_rows = min([i for t, i in theirs_vocab.items() if t in ADDED], default=len(theirs_vocab))
    assert {t: i for t, i in ours_vocab.items() if i < base_rows} == {t: i for t, i in theirs_vocab.items() if i < base_rows}
    config = {k: json.loads((f / "config.json").read_text())["vocab_size"] for k, f in
              (("theirs", theirs_folder), ("ours", ours_folder))}
    assert config["ours"] == config["theirs"] == ours["model.embed_tokens.weight"].shape[0]


def _run_both(tmp_path: Path, recipe: dict) -> tuple[Path, Path]:
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    run_mergekit(path, tmp_path / "mergekit_out")
    run_deltawise(path, tmp_path / "deltawise_out")
    return tmp_path / "mergekit_out", tmp_path / "deltawise_out"


@pytest.mark.parametrize("source", ["union", "base", "b"])
def test_tokenizer_source_matches_mergekit(vocab_family, tmp_path, source):
    f = vocab_family
    recipe = {"merge_method": "linear", "base_model": str(f["base"]),
              "models": [{"model": str(f["base"]), "parameters": {"weight": 0.2}},
                         {"model": str(f["a"]), "parameters": {"weight": 0.5}},
                         {"model": str(f["b"]), "parameters": {"weight": 0.3}}],
              "tokenizer_source": str(f["b"]) if source == "b" else source, "dtype": "float32"}
    theirs, ours = _run_both(tmp_path, recipe)
    _compare_token_by_token(theirs, ours)
    vocab = _vocab(ours)
    if source == "union":
        assert {"<|shared|>", "<|only_a|>", "<|only_b|>", "apple"} <= set(vocab)
    if source == "base":
        assert set(vocab) == set(_vocab(f["base"]))


def test_union_task_arithmetic_with_token_section_matches_mergekit(vocab_family, tmp_path):
    f = vocab_family
    recipe = {"merge_method": "task_arithmetic", "base_model": str(f["base"]),
              "models": [{"model": str(f["a"]), "parameters": {"weight": 1.0}},
                         {"model": str(f["b"]), "parameters": {"weight": 0.5}}],
              "tokenizer": {"source": "union", "pad_to_multiple_of": 8,
                            "tokens": {"<|only_a|>": {"source": {"kind": "zero"}},
                                       "<|shared|>": {"source": str(f["b"]), "force": True},
                                       "<|extra|>": {"source": {"kind": "model_token", "model": str(f["a"]), "token": "cat"}}}},
              "chat_template": "chatml", "dtype": "float32"}
    theirs, ours = _run_both(tmp_path, recipe)
    _compare_token_by_token(theirs, ours)
    from transformers import AutoTokenizer

    ours_tok, theirs_tok = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    assert ours_tok.chat_template == theirs_tok.chat_template and "<|im_start|>" in ours_tok.chat_template
    state = load_folder(ours)
    assert state["model.embed_tokens.weight"].shape[0] % 8 == 0


def test_sliced_union_matches_mergekit(vocab_family, tmp_path):
    """A slices: recipe (SLERP with a gradient) with a union vocabulary: the embeddings and LM head,
    outside the slices, are aligned the same way."""
    f = vocab_family
    recipe = {"merge_method": "slerp", "base_model": str(f["a"]),
              "slices": [{"sources": [{"model": str(f["a"]), "layer_range": [0, 2]},
                                      {"model": str(f["b"]), "layer_range": [0, 2]}]}],
              "parameters": {"t": [0.2, 0.8]}, "tokenizer_source": "union", "dtype": "float32"}
    theirs, ours = _run_both(tmp_path, recipe)
    _compare_token_by_token(theirs, ours)


def test_row_rules_by_hand(vocab_family, tmp_path):
    """Linear, weights 0.5/0.5, union: a token only model a has takes a's row in both models (so the
    merged row is a's); a token both have is the mean of their rows; a padding row is the mean of the
    merged vocabulary rows. ``new_rows: mean`` gives b its own mean row for a's token instead."""
    f = vocab_family
    a, b = load_file(f["a"] / "model.safetensors"), load_file(f["b"] / "model.safetensors")
    va, vb = _vocab(f["a"]), _vocab(f["b"])
    for new_rows in ("mergekit", "mean"):
        recipe = {"merge_method": "linear", "models": [{"model": str(f["a"]), "parameters": {"weight": 0.5}},
                                                        {"model": str(f["b"]), "parameters": {"weight": 0.5}}],
                  "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "new_rows": new_rows}}
        out = tmp_path / new_rows
        deltawise_merge(write_recipe(tmp_path / f"{new_rows}.yaml", recipe), out)
        vocab, merged = _vocab(out), load_file(out / "model.safetensors")["model.embed_tokens.weight"]
        emb_a, emb_b = a["model.embed_tokens.weight"], b["model.embed_tokens.weight"]
        only_a = vocab["<|only_a|>"]
        want = (emb_a[va["<|only_a|>"]] if new_rows == "mergekit"
                else 0.5 * emb_a[va["<|only_a|>"]] + 0.5 * emb_b.mean(dim=0))
        torch.testing.assert_close(merged[only_a], want)
        shared = vocab["<|shared|>"]
        torch.testing.assert_close(merged[shared], 0.5 * emb_a[va["<|shared|>"]] + 0.5 * emb_b[vb["<|shared|>"]])
        assert merged.shape[0] % 16 == 0 and merged.shape[0] > len(vocab)
        torch.testing.assert_close(merged[len(vocab)], merged[: len(vocab)].mean(dim=0), atol=1e-6, rtol=1e-5)


def test_different_tokens_on_a_row_are_refused(vocab_family, tmp_path):
    """Without tokenizer_source, a and b put different tokens on the rows past the base vocabulary:
    merging them row by row is refused, naming the fix; with tokenizer_source it runs."""
    f = vocab_family
    recipe = {"merge_method": "linear", "models": [{"model": str(f["b"]), "parameters": {"weight": 0.5}},
                                                    {"model": str(f["a"]), "parameters": {"weight": 0.5}}]}
    with pytest.raises(RecipeError, match="different tokens on .* tokenizer_source"):
        deltawise_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    deltawise_merge({**recipe, "tokenizer_source": "union"}, tmp_path / "out")


def test_bad_token_source_is_a_recipe_error(vocab_family, tmp_path):
    f = vocab_family
    recipe = {"merge_method": "linear", "models": [{"model": str(f["a"]), "parameters": {"weight": 0.5}},
                                                    {"model": str(f["b"]), "parameters": {"weight": 0.5}}],
              "tokenizer": {"source": "union", "tokens": {"<|new|>": {"source": {"kind": "model_token",
                                                                                   "model": str(f["a"]), "token": "nope"}}}}}
    with pytest.raises(RecipeError, match="has no token 'nope'"):
        deltawise_merge(recipe, tmp_path / "out")


def test_chat_template_without_tokenizer_source(vocab_family, tmp_path):
    """Rows merged as they are (a's extra rows cut to the base's, whose tokens they share); the copied
    tokenizer gets the named template, as mergekit writes it."""
    from transformers import AutoTokenizer

    from deltawise.merge.vocabulary import NAMED_TEMPLATES

    f = vocab_family
    recipe = {"merge_method": "task_arithmetic", "base_model": str(f["base"]),
              "models": [{"model": str(f["a"]), "parameters": {"weight": 1.0}}], "chat_template": "llama3"}
    deltawise_merge(recipe, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == NAMED_TEMPLATES["llama3"]
    assert tok.get_vocab() == _vocab(f["base"])
    with pytest.raises(RecipeError, match="neither a template name"):
        deltawise_merge({**recipe, "chat_template": "nosuch"}, tmp_path / "out2")


def test_chat_template_without_any_tokenizer_warns(llama_family, tmp_path):
    """As mergekit: the merge runs, a warning says that the template has no tokenizer to go into."""
    from deltawise.merge import build_plan
    from deltawise.merge.recipe import parse_recipe

    recipe = {"merge_method": "linear", "models": [{"model": str(llama_family["ft1"])}, {"model": str(llama_family["ft2"])}],
              "chat_template": "chatml"}
    plan = build_plan(parse_recipe(recipe))
    assert any("chat_template" in w and "no tokenizer files" in w for w in plan.warnings), plan.warnings
    deltawise_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()
