"""Merge recipes whose models are delta folders and PEFT adapters, next to full fine-tunes."""

from __future__ import annotations

import pytest
import torch
from delta_util import edit_model, low_rank
from safetensors.torch import load_file

from deltawise.delta.compress import compress_delta
from deltawise.delta.extract import extract_delta
from deltawise.delta.lora_extract import extract_lora
from deltawise.delta.store import DeltaFile
from deltawise.errors import RecipeError
from deltawise.merge import merge
from conftest import load_state, save_llama, tree_digest

Q0 = "model.layers.0.self_attn.q_proj.weight"


def test_recipe_mixing_full_lora_and_compressed(llama_family, tmp_path):
    base, ft1, ft2 = llama_family["base"], llama_family["ft1"], llama_family["ft2"]
    lora_ft = edit_model(base, tmp_path / "lora_ft", {Q0: lambda w: w + low_rank((32, 32), 2, seed=3)})
    extract_lora(str(lora_ft), str(base), tmp_path / "adapter", rank=2)
    extract_delta(str(ft2), str(base), tmp_path / "d2")
    compress_delta(str(tmp_path / "d2"), tmp_path / "c2", density=0.3, alpha=1.5)
    inputs = [base, ft1, tmp_path / "adapter", tmp_path / "d2", tmp_path / "c2"]
    digests = [tree_digest(p) for p in inputs]
    recipe = {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(ft1), "parameters": {"weight": 1.0}},
                   {"model": str(tmp_path / "adapter"), "parameters": {"weight": 0.5}},
                   {"model": str(tmp_path / "c2"), "parameters": {"weight": 2.0}}],
        "parameters": {"lambda": 1.0},
    }
    merge(recipe, tmp_path / "merged")
    got, b, f1 = load_state(tmp_path / "merged"), load_state(base), load_state(ft1)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    compressed = DeltaFile(tmp_path / "c2")
    module = "base_model.model." + Q0.removesuffix(".weight")
    for name in b:
        lora = torch.zeros_like(b[name])
        if name == Q0:  # lora_alpha = r: scale 1, B already carries the singular values
            lora = adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]
        comp = compressed.get(name).materialize()
        want = b[name] + 1.0 * (f1[name] - b[name]) + 0.5 * ((b[name] + lora) - b[name]) + 2.0 * ((b[name] + comp) - b[name])
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.allclose(got[Q0], (b[Q0] + (f1[Q0] - b[Q0]) + 2.0 * compressed.get(Q0).materialize()), atol=1e-4)
    assert [tree_digest(p) for p in inputs] == digests


def test_recipe_with_a_delta_of_another_shape_fails_clearly(llama_family, tmp_path):
    other = save_llama(tmp_path / "wide", hidden_size=48, intermediate_size=64)
    wide_ft = edit_model(other, tmp_path / "wide_ft", {"model.norm.weight": lambda w: w + 1})
    extract_delta(str(wide_ft), str(other), tmp_path / "wide_delta")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama_family["base"]),
              "models": [{"model": str(llama_family["ft1"])}, {"model": str(tmp_path / "wide_delta")}]}
    with pytest.raises(RecipeError, match=r"(?s)wide_delta.*does not fit .*base.*"
                                          r"model.norm.weight has shape \[48\] in the delta, \[32\] in the base"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recipe_warns_when_a_delta_moves_to_another_base(llama_family, tmp_path):
    from deltawise.merge import build_plan, parse_recipe

    extract_delta(str(llama_family["ft1"]), str(llama_family["base"]), tmp_path / "d1")
    own = build_plan(parse_recipe({"merge_method": "task_arithmetic", "base_model": str(llama_family["base"]),
                                   "models": [{"model": str(tmp_path / "d1")}]}))
    assert not own.warnings
    moved = build_plan(parse_recipe({"merge_method": "task_arithmetic", "base_model": str(llama_family["ft2"]),
                                     "models": [{"model": str(tmp_path / "d1")}]}))
    assert any("transfer to a new base" in w for w in moved.warnings)
