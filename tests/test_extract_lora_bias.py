"""``extract --lora`` of fine-tunes whose biases changed: the biases are placed by the merge's adapter-output rule
(``lora_layout``): ``lora_B.bias`` (``lora_bias: true``), ``base_layer.bias`` beside LoRA embeddings, whole when a
LoRA module's base layer has no bias.

Checked on a full fine-tune of a tiny BERT body (every weight and bias moved) with the default options: PEFT loads the
adapter, its forward and its ``merge_and_unload`` equal ``deltawise apply`` of it, the biases are the fine-tune's
exactly and each weight is off by the SVD error the report gives (computed here from the singular values); at full
rank the adapter is the fine-tune (a property). Also: a bias whose weight did not change (zero rank-1 factors), a
Llama with a bias beside bias-free LoRA layers (saved whole, exact), ``--non-linear skip``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from delta_util import edit_model, low_rank
from safetensors.torch import load_file
from test_adapter_embeddings import QUERY, bert, bert_model, peft_merged  # noqa: F401  (bert: a fixture)
from typer.testing import CliRunner

from conftest import load_state, save_llama
from deltawise.cli import app
from deltawise.delta.apply import apply_delta
from deltawise.delta.lora_extract import extract_lora

peft = pytest.importorskip("peft")


def config_of(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def linear_modules(state: dict[str, torch.Tensor]) -> set[str]:
    return {k.removesuffix(".weight") for k, v in state.items()
            if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k}


def test_a_full_bert_fine_tune_extracts_with_the_defaults_and_peft_equals_apply(bert, tmp_path):
    base, ft = bert["base_state"], load_state(bert["full"])
    run = CliRunner().invoke(app, ["extract", str(bert["full"]), "--base", str(bert["base"]), "--lora", "--rank", "4",
                                   "-o", str(tmp_path / "ad"), "--report", str(tmp_path / "r.json"), "-q"])
    assert run.exit_code == 0, run.output
    rows = {t["name"]: t for t in json.loads((tmp_path / "r.json").read_text())["tensors"]}
    config = config_of(tmp_path / "ad")
    linear = linear_modules(base)
    assert config["lora_bias"] is True and config["bias"] == "none" and set(config["target_modules"]) == linear
    assert set(config["modules_to_save"]) == {"embeddings.word_embeddings", "embeddings.position_embeddings",
                                              "embeddings.token_type_embeddings", "embeddings.LayerNorm",
                                              *(f"encoder.layer.{i}.{m}.LayerNorm" for i in (0, 1)
                                                for m in ("attention.output", "output"))}
    stored = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert {k for k in stored if k.endswith("lora_B.bias")} == {f"base_model.model.{m}.lora_B.bias" for m in linear}
    assert all(rows[f"{m}.bias"]["kind"] == "bias" and rows[f"{m}.bias"]["extra"] == {"as": "lora_B.bias"} for m in linear)
    apply_delta(str(tmp_path / "ad"), str(bert["base"]), tmp_path / "applied")
    applied, merged = load_state(tmp_path / "applied"), peft_merged(bert_model(bert["base"]), tmp_path / "ad")
    for name in base:
        torch.testing.assert_close(merged[name], applied[name], rtol=1e-5, atol=1e-6, msg=name)
        if name.endswith(".bias") or base[name].dim() == 1 or "embeddings" in name:  # not LoRA factors: exact
            assert torch.equal(merged[name], applied[name]), name
            torch.testing.assert_close(applied[name], ft[name], rtol=0, atol=1e-7, msg=name)
        else:  # a LoRA weight: off by the SVD tail, as reported
            want = ft[name].double() - base[name].double()
            s = torch.linalg.svdvals(want)
            assert rows[name]["error"] == pytest.approx(float(s[4:].norm() / s.norm()), abs=1e-5), name
            got = float((applied[name].double() - base[name].double() - want).norm() / want.norm())
            assert got == pytest.approx(rows[name]["error"], abs=1e-4), name
    assert min(rows[f"{m}.weight"]["error"] for m in linear) > 0.1  # rank 4 is far from a full fine-tune
    with torch.no_grad():  # PEFT's forward, the adapter unmerged, gives the applied body's output
        unmerged = peft.PeftModel.from_pretrained(bert_model(bert["base"]), tmp_path / "ad").eval()(ids())
        torch.testing.assert_close(unmerged.last_hidden_state, bert_model(tmp_path / "applied")(ids()).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


def test_at_full_rank_the_adapter_is_the_fine_tune(bert, tmp_path):
    """Property: with every singular value kept (rank 32 >= the smaller side of every matrix), PEFT's merge of the
    extracted adapter is the fine-tune, with LoRA tables too (whose biases are written as base_layer.bias)."""
    for embeddings in ("whole", "lora"):
        out = tmp_path / embeddings
        extract_lora(str(bert["full"]), str(bert["base"]), out, rank=32, embeddings=embeddings)
        config = config_of(out)
        assert (config["lora_bias"], config["bias"]) == ((True, "none") if embeddings == "whole" else (False, "lora_only"))
        merged = peft_merged(bert_model(bert["base"]), out)
        for name, value in load_state(bert["full"]).items():
            torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=f"{embeddings}: {name}")


def test_a_bias_whose_weight_did_not_change_rides_on_zero_factors(bert, tmp_path):
    bias = f"{QUERY}.bias"
    value = "encoder.layer.0.attention.self.value.weight"
    ft = edit_model(bert["base"], tmp_path / "ft", {bias: lambda b: b + 0.25 * torch.arange(32.0) / 32,
                                                    value: lambda w: w + low_rank((32, 32), 2, seed=5)})
    result = extract_lora(str(ft), str(bert["base"]), tmp_path / "ad", rank=2)
    assert set(config_of(tmp_path / "ad")["target_modules"]) == {QUERY, value.removesuffix(".weight")}
    stored = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert not stored[f"base_model.model.{QUERY}.lora_B.weight"].any()  # rank-1 zeros: the weight stays
    assert stored[f"base_model.model.{QUERY}.lora_A.weight"].shape == (1, 32)
    assert {r.name: r.kind for r in result.rows} == {bias: "bias", value: "lowrank"}
    assert result.summary["lora_tensors"] == 1 and result.summary["lora_biases"] == 1
    merged, want = peft_merged(bert_model(bert["base"]), tmp_path / "ad"), load_state(ft)
    for name in want:
        torch.testing.assert_close(merged[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(merged[bias], want[bias])
    apply_delta(str(tmp_path / "ad"), str(bert["base"]), tmp_path / "applied")
    assert torch.equal(load_state(tmp_path / "applied")[bias], want[bias])


def test_a_bias_beside_bias_free_lora_layers_saves_its_module_whole(tmp_path):
    """Llama with attention biases: a q_proj whose weight and bias changed beside an up_proj (no bias) that changed;
    lora_bias would give up_proj a bias PEFT cannot merge, so q_proj is saved whole, weight included, exactly."""
    base = save_llama(tmp_path / "base", attention_bias=True)
    q, up = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj.weight"
    ft = edit_model(base, tmp_path / "ft", {f"{q}.weight": lambda w: w + low_rank((32, 32), 4, seed=1),
                                            f"{q}.bias": lambda b: b + 0.1, up: lambda w: w + low_rank((64, 32), 2, seed=2)})
    result = extract_lora(str(ft), str(base), tmp_path / "ad", rank=2)
    assert any("saved whole" in w for w in result.warnings)
    config = config_of(tmp_path / "ad")
    assert config["lora_bias"] is False and config["modules_to_save"] == [q] and config["target_modules"] == [
        up.removesuffix(".weight")]
    assert {r.name: r.kind for r in result.rows}[f"{q}.weight"] == "modules_to_save"
    apply_delta(str(tmp_path / "ad"), str(base), tmp_path / "applied")
    applied, want = load_state(tmp_path / "applied"), load_state(ft)
    assert torch.equal(applied[f"{q}.weight"], want[f"{q}.weight"]) and torch.equal(applied[f"{q}.bias"], want[f"{q}.bias"])
    from transformers import LlamaForCausalLM

    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base).eval(), tmp_path / "ad")
    merged = model.merge_and_unload().state_dict()
    for name in want:
        torch.testing.assert_close(merged[name], applied[name], rtol=1e-5, atol=1e-6, msg=name)


def test_non_linear_skip_leaves_the_biases_out(bert, tmp_path):
    result = extract_lora(str(bert["full"]), str(bert["base"]), tmp_path / "ad", rank=4, non_linear="skip")
    config = config_of(tmp_path / "ad")
    assert config["lora_bias"] is False and not config["modules_to_save"]
    assert not any(k.endswith(".bias") for k in load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    assert any(f"{QUERY}.bias" in w and "skipped" in w for w in result.warnings)
    applied = load_state(apply_delta(str(tmp_path / "ad"), str(bert["base"]), tmp_path / "applied").out)
    assert torch.equal(applied[f"{QUERY}.bias"], bert["base_state"][f"{QUERY}.bias"])
