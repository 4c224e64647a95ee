"""``slices:`` and ``modules:`` recipes: layer stacks (frankenmerges), per-slice gradients and parameters.

Each recipe file is run through mergekit 0.1.5 itself and through deltawise on tiny 6-layer Llama models,
and every tensor is compared (helpers from test_mergekit_compat.py); the output config's layer count is
checked, and recipes that cannot mean anything are refused with a message naming the fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import perturb, save_llama
from test_mergekit_compat import assert_not_a_copy, assert_same_tensors, load_folder, run_deltawise, write_recipe
from test_mergekit_compat import layer_source as src, merge_both  # noqa: F401 (merge_both: a fixture)

from deltawise.errors import RecipeError
from deltawise.merge import build_plan, parse_recipe


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> dict[str, Path]:
    """A 6-layer tiny Llama base and two fine-tunes."""
    root = tmp_path_factory.mktemp("llama6")
    base = save_llama(root / "base", seed=3, num_hidden_layers=6)
    return {"base": base, "ft1": perturb(base, root / "ft1", seed=31), "ft2": perturb(base, root / "ft2", seed=32)}


def layers_in(config_folder: Path) -> int:
    return json.loads((config_folder / "config.json").read_text())["num_hidden_layers"]


def test_passthrough_frankenmerge_stacks_overlapping_ranges_as_mergekit(six, merge_both):
    # mergekit's orcamini-platy-44layer.yml in miniature: layers 0-3 of ft1, then 2-5 of ft2 (overlapping)
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [src(six["ft1"], 0, 4)]}, {"sources": [src(six["ft2"], 2, 6)]}]}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="frankenmerge")
    assert layers_in(out) == 8
    ft1, ft2 = load_folder(six["ft1"]), load_folder(six["ft2"])
    assert torch.equal(dw["model.layers.1.mlp.up_proj.weight"], ft1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(dw["model.layers.5.mlp.up_proj.weight"], ft2["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(dw["model.embed_tokens.weight"], ft1["model.embed_tokens.weight"])  # first slice
    assert torch.equal(dw["lm_head.weight"], ft2["lm_head.weight"]) and torch.equal(dw["model.norm.weight"],
                                                                                     ft2["model.norm.weight"])  # last


def test_gradient_slerp_over_a_slice_matches_mergekit(six, merge_both):
    # mergekit's gradient-slerp.yml in miniature: the t gradient runs over the slice's layers
    recipe = {"merge_method": "slerp", "base_model": str(six["ft1"]), "dtype": "float32",
              "slices": [{"sources": [src(six["ft1"], 0, 6), src(six["ft2"], 0, 6)]}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                   {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="gradient slerp")
    assert_not_a_copy(dw, {"ft1": load_folder(six["ft1"]), "ft2": load_folder(six["ft2"])})
    assert layers_in(out) == 6


def test_two_slerp_slices_with_their_own_gradients_and_ranges(six, merge_both):
    # each slice restarts the gradient (t = k / (n - 1) within it); the second pairs different layers
    recipe = {"merge_method": "slerp", "base_model": str(six["ft1"]), "dtype": "float32",
              "slices": [{"sources": [src(six["ft1"], 0, 3), src(six["ft2"], 0, 3)], "parameters": {"t": [0.1, 0.9]}},
                         {"sources": [src(six["ft1"], 3, 6), src(six["ft2"], 1, 4)]},
                         {"sources": [src(six["ft1"], 5, 6), src(six["ft2"], 5, 6)], "parameters": {"t": [0.0, 0.8]}}],
              "parameters": {"t": [0.2, 0.6]}}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="sliced slerp")
    assert layers_in(out) == 7


def test_task_arithmetic_slices_resolve_source_then_slice_then_recipe_parameters(six, merge_both):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(six["base"]), "dtype": "float32",
              "parameters": {"weight": 0.1},
              "slices": [{"sources": [src(six["base"], 0, 3), src(six["ft1"], 0, 3, weight=0.5), src(six["ft2"], 0, 3)]},
                         {"sources": [src(six["base"], 3, 6), src(six["ft1"], 3, 6), src(six["ft2"], 3, 6, weight=0.9)],
                          "parameters": {"weight": 0.7}}]}
    mk, dw, _ = merge_both(recipe)
    assert_same_tensors(mk, dw, label="sliced task arithmetic")


def test_modules_recipes_with_slices_and_with_models(six, merge_both):
    sliced = {"merge_method": "passthrough", "dtype": "float32",
              "modules": {"default": {"slices": [{"sources": [src(six["ft2"], 0, 2)]}, {"sources": [src(six["ft1"], 1, 6)]}]}}}
    mk, dw, out = merge_both(sliced)
    assert_same_tensors(mk, dw, label="modules slices")
    assert layers_in(out) == 7
    models = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
              "modules": {"default": {"models": [{"model": str(six["ft1"])}, {"model": str(six["ft2"])}],
                                      "parameters": {"weight": [0.2, 0.9]}}}}
    mk, dw, out = merge_both(models)
    assert_same_tensors(mk, dw, label="modules models")
    assert layers_in(out) == 6


@pytest.mark.parametrize("slices, message", [
    ([{"sources": [{"layer_range": [4, 8]}]}], "layer_range [4, 8] goes past the 6 layers"),
    ([{"sources": [{"layer_range": [3, 3]}]}], "layer_range [3, 3] is empty or reversed"),
    ([{"sources": [{"layer_range": [5, 2]}]}], "layer_range [5, 2] is empty or reversed"),
    ([{"sources": [{"layer_range": [0, 3]}, {"model": "ft2", "layer_range": [0, 2]}]}],
     "the sources cover different numbers of layers (3, 2)"),
    ([{"sources": [{"layer_range": [0, 3]}, {"layer_range": [3, 6]}]}], "is the same model as sources[0]"),
    ([{"sources": []}], "'sources' is empty"),
])
def test_meaningless_slices_are_refused_with_the_reason(six, slices, message):
    for sl in slices:
        for s in sl["sources"]:
            s["model"] = str(six[s.get("model", "ft1")])
    recipe = parse_recipe({"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": slices})
    with pytest.raises(RecipeError) as exc:
        build_plan(recipe)
    assert message in str(exc.value)


def test_slerp_base_must_be_a_source_of_each_slice(six):
    recipe = parse_recipe({"merge_method": "slerp", "base_model": str(six["base"]), "parameters": {"t": 0.5},
                           "slices": [{"sources": [src(six["ft1"], 0, 6), src(six["ft2"], 0, 6)]}]})
    with pytest.raises(RecipeError, match=r"slices\[0\]: base_model .* is not one of the slice's sources"):
        build_plan(recipe)


def test_models_and_slices_together_are_refused():
    with pytest.raises(RecipeError, match="exactly one of 'models', 'slices' or 'modules'"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a"}],
                      "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]})


def test_slice_parameters_are_checked_like_any_other(six):
    recipe = parse_recipe({"merge_method": "slerp", "base_model": str(six["ft1"]),
                           "slices": [{"sources": [src(six["ft1"], 0, 6), src(six["ft2"], 0, 6)],
                                       "parameters": {"t": "half"}}]})
    with pytest.raises(RecipeError, match=r"slices\[0\]\.parameters\.t"):
        build_plan(recipe)


def test_tied_embeddings_frankenmerge_matches_mergekit(tmp_path_factory, merge_both):
    # no lm_head.weight in tied checkpoints: the output stays tied, as mergekit skips the optional head
    root = tmp_path_factory.mktemp("llama_tied6")
    base = save_llama(root / "base", seed=4, num_hidden_layers=4, tie_word_embeddings=True)
    ft = perturb(base, root / "ft", seed=41)
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [src(base, 0, 3)]}, {"sources": [src(ft, 1, 4), ]}]}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="tied frankenmerge")
    assert "lm_head.weight" not in dw and layers_in(out) == 6


def test_several_modules_of_a_text_model_are_refused(six):
    # several modules are a vision-language model's (tests/test_modules_recipes.py); a Llama has one
    slices = [{"sources": [src(six["ft1"], 0, 2)]}]
    recipe = parse_recipe({"merge_method": "passthrough",
                           "modules": {"text_decoder": {"slices": slices}, "vision_tower": {"slices": slices}}})
    with pytest.raises(RecipeError, match=r"is LlamaForCausalLM, a model of one layer stack \(by its tensor names, as "
                                          r"mergekit infers modules: model.layers\)"):
        build_plan(recipe)


def test_per_layer_config_entries_follow_their_layers(tmp_path):
    # Qwen2's layer_types (full/sliding attention per layer) must keep one entry per output layer, or
    # transformers refuses the config; each entry is the one of the layer the output layer came from
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, use_sliding_window=True, max_window_layers=1)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(tmp_path / "qwen"), "layer_range": [0, 2]}]},
                                                        {"sources": [{"model": str(tmp_path / "qwen"), "layer_range": [0, 3]}]}]}
    out = run_deltawise(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "out")
    loaded = AutoConfig.from_pretrained(tmp_path / "out")
    assert loaded.num_hidden_layers == 5
    assert loaded.layer_types == ["full_attention", "sliding_attention", "full_attention", "sliding_attention",
                                  "sliding_attention"]
    assert len([k for k in out if k.endswith("self_attn.q_proj.weight")]) == 5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_threaded_frankenmerge_is_the_same_bytes_and_hashes_in_flight(six, tmp_path, monkeypatch, dtype):
    """A passthrough copied as stored (float32) or cast (bfloat16), in 6-row chunks, into many shards: one
    worker and three give the same bytes; every manifest sha256 is the file's; the single worker, writing
    each shard in order, hashes everything from memory (nothing read back); the copied tensors are the
    sources' own rows, and the bits of the float32 round trip the copy path replaced."""
    import hashlib
    import os

    import deltawise.io.writer as writer_module
    from deltawise.merge import engine as engine_module, merge

    class CountingOs:
        read_back = 0

        def __getattr__(self, name):
            return getattr(os, name)

        def preadv(self, fd, buffers, offset):
            n = os.preadv(fd, buffers, offset)
            CountingOs.read_back += n
            return n

    monkeypatch.setattr(writer_module, "os", CountingOs())
    # copies take 4 x 48 entries: 6 rows of a 32-wide matrix, so chunks end mid-tensor and the last one is short
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 48)
    recipe = {"merge_method": "passthrough", "dtype": dtype,
              "slices": [{"sources": [src(six["ft1"], 0, 4)]}, {"sources": [src(six["ft2"], 2, 6)]}]}
    outs = {}
    for threads in (1, 3):
        CountingOs.read_back = 0
        outs[threads] = tmp_path / f"t{threads}"
        merge(recipe, str(outs[threads]), threads=threads, shard_size=20_000)
        manifest = json.loads((outs[threads] / "deltawise_merge.json").read_text())
        assert len(manifest["shards"]) >= 4
        for shard in manifest["shards"]:
            assert shard["sha256"] == hashlib.sha256((outs[threads] / shard["file"]).read_bytes()).hexdigest()
        if threads == 1:
            assert CountingOs.read_back == 0
    # the float32 round trip (scale 1.0 is merged, not copied: x * 1.0, cast) writes the same shards
    scaled = {**recipe, "slices": [{"sources": [src(six["ft1"], 0, 4, scale=1.0)]},
                                   {"sources": [src(six["ft2"], 2, 6, scale=1.0)]}]}
    merge(scaled, str(tmp_path / "scaled"), threads=2, shard_size=20_000)
    for shard in manifest["shards"]:
        data = (outs[1] / shard["file"]).read_bytes()
        assert data == (outs[3] / shard["file"]).read_bytes() == (tmp_path / "scaled" / shard["file"]).read_bytes()
    dw, ft2 = load_folder(outs[3]), load_folder(six["ft2"])
    want = ft2["model.layers.3.self_attn.q_proj.weight"].to(getattr(torch, dtype))
    assert torch.equal(dw["model.layers.5.self_attn.q_proj.weight"], want)
