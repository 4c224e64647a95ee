"""merge_state_dicts: the in-memory merge gives the streaming engine's tensors (same method code),
follows mergekit 0.1.5's ``merge_state_dicts`` call, and refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama_config
from test_mergekit_compat import assert_same_tensors, load_folder

from deltawise.errors import RecipeError
from deltawise.merge import merge, merge_state_dicts

# method, recipe-wide parameters, per-model parameters (ft1, ft2, ft3), base given
CASES = {
    "linear": ("linear", {}, [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], False),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}, [{"weight": 0.6}, {"weight": 0.8}, {"weight": -0.3}], True),
    "ties": ("ties", {}, [{"weight": w, "density": 0.3} for w in (0.5, 1.0, 0.8)], True),
    "ties-global": ("ties", {"granularity": "global"}, [{"density": 0.2}] * 3, True),
    "dare_ties": ("dare_ties", {}, [{"weight": 1.0, "density": 0.5}] * 3, True),
    "nuslerp": ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{"weight": 0.3}, {"weight": 0.7}], True),
    "multislerp": ("multislerp", {}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.9}], True),
    "karcher": ("karcher", {}, [{}, {}, {}], False),
    "ramplus_tl": ("ramplus_tl", {"r": 0.5, "alpha": 1.0}, [{}, {}, {}], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_in_memory_merge_equals_the_streaming_merge(case, llama_family, tmp_path):
    method, params, per_model, with_base = CASES[case]
    names = [f"ft{i + 1}" for i in range(len(per_model))]
    recipe = {
        "merge_method": method,
        "models": [{"model": str(llama_family[n]), "parameters": p} for n, p in zip(names, per_model)],
        "parameters": params,
        "seed": 7,
    }
    if with_base:
        recipe["base_model"] = str(llama_family["base"])
    merge(recipe, tmp_path / "out")
    streamed = load_folder(tmp_path / "out")

    states = {n: load_folder(llama_family[n]) for n in (["base"] if with_base else []) + names}
    per_model_params = {key: {n: p[key] for n, p in zip(names, per_model)} for key in per_model[0]}  # keyed by model id
    merged = merge_state_dicts(states, method, parameters={**params, **per_model_params},
                               base="base" if with_base else None, seed=7)
    assert list(merged) == list(states[names[0]])  # the template's order
    assert_same_tensors(streamed, merged, atol=1e-7, rtol=1e-6, label=case)


def test_per_model_values_as_a_sequence_and_modules_as_inputs():
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    modules = [LlamaForCausalLM(tiny_llama_config()) for _ in range(2)]
    by_sequence = merge_state_dicts(modules, "linear", parameters={"weight": [1.0, 3.0]})
    by_mapping = merge_state_dicts({0: modules[0].state_dict(), 1: modules[1].state_dict()}, "linear",
                                   parameters={"weight": {0: 1.0, 1: 3.0}})
    name = "model.layers.0.mlp.down_proj.weight"
    expected = (modules[0].state_dict()[name] + 3 * modules[1].state_dict()[name]) / 4
    torch.testing.assert_close(by_sequence[name], expected)
    assert all(torch.equal(by_sequence[k], by_mapping[k]) for k in by_sequence)


def test_same_call_as_mergekit_gives_mergekit_tensors(llama_family):
    from mergekit.merge_methods.api import merge_state_dicts as mergekit_merge_state_dicts

    states = {n: load_folder(llama_family[n]) for n in ("base", "ft1", "ft2")}
    parameters = {"weight": {"ft1": 0.4, "ft2": 0.6}, "nuslerp_flatten": False}
    theirs = mergekit_merge_state_dicts(states, "nuslerp", parameters=parameters, base="base")
    ours = merge_state_dicts(states, "nuslerp", parameters=parameters, base="base")
    assert_same_tensors(theirs, ours, label="nuslerp in memory")


def test_bfloat16_inputs_are_computed_in_float32_and_returned_as_the_template(llama_family):
    states = {n: {k: v.to(torch.bfloat16) for k, v in load_folder(llama_family[n]).items()} for n in ("ft1", "ft2")}
    out = merge_state_dicts(states, "linear")
    name = "model.norm.weight"
    assert out[name].dtype == torch.bfloat16
    expected = ((states["ft1"][name].float() + states["ft2"][name].float()) / 2).to(torch.bfloat16)
    assert torch.equal(out[name], expected)
    assert merge_state_dicts(states, "linear", out_dtype=torch.float32)[name].dtype == torch.float32


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: merge_state_dicts(s, "no_such_method"), "unknown merge method"),
        (lambda s: merge_state_dicts(s, "fisher", base="base"), "run it from a recipe"),
        (lambda s: merge_state_dicts(s, "ties"), "needs a base"),
        (lambda s: merge_state_dicts(s, "nuslerp", base="base", parameters={"weight": [1.0]}), "1 values for 2 models"),
        (lambda s: merge_state_dicts(s, "linear", parameters={"wieght": 1.0}), "no parameter 'wieght'"),
        (lambda s: merge_state_dicts(s, "ties", base="nope"), "not one of the models"),
        (lambda s: merge_state_dicts({**s, "ft2": {k: v for k, v in s["ft2"].items() if "norm" not in k}}, "linear"),
         "different tensor names"),
    ],
    ids=["unknown", "side-files", "no-base", "sequence-length", "unknown-parameter", "unknown-base", "keys-differ"],
)
def test_refusals(llama_family, call, message):
    states = {n: load_folder(llama_family[n]) for n in ("base", "ft1", "ft2")}
    with pytest.raises(RecipeError, match=message):
        call(states)


def test_non_strict_merges_the_common_tensors(llama_family):
    states = {n: load_folder(llama_family[n]) for n in ("ft1", "ft2")}
    states["ft2"] = {k: v for k, v in states["ft2"].items() if k != "lm_head.weight"}
    out = merge_state_dicts(states, "linear", strict=False)
    assert "lm_head.weight" not in out and set(out) == set(states["ft2"])
