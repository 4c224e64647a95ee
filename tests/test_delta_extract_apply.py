"""extract -> apply round trips, LoRA extraction by SVD, removal, patch transfer, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from delta_util import edit_model, low_rank
from safetensors.torch import load_file

from deltawise.cli import app
from deltawise.delta.apply import apply_delta
from deltawise.delta.extract import extract_delta
from deltawise.delta.lora_extract import choose_rank, extract_lora
from deltawise.errors import DeltawiseError, InputError, OutputError
from conftest import load_state, save_llama, tree_digest

Q0 = "model.layers.0.self_attn.q_proj.weight"  # (32, 32)
UP1 = "model.layers.1.mlp.up_proj.weight"  # (64, 32)
NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def rank3(llama_family, tmp_path_factory):
    """base + an exactly rank-3 change of two linear weights and a changed norm."""
    root = tmp_path_factory.mktemp("rank3")
    ft = edit_model(llama_family["base"], root / "ft", {
        Q0: lambda w: w + low_rank((32, 32), 3, seed=1), UP1: lambda w: w + low_rank((64, 32), 3, seed=2),
        NORM: lambda w: w + 0.1,
    })
    return {"base": llama_family["base"], "ft": ft}


def test_extract_then_apply_is_exact(llama_family, tmp_path):
    base, ft = llama_family["base"], llama_family["ft1"]
    before = tree_digest(base), tree_digest(ft)
    result = extract_delta(str(ft), str(base), tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["base"]["fingerprint"] and meta["base"]["config"]["architectures"] == ["LlamaForCausalLM"]
    assert result.summary["changed_tensors"] == len(load_state(ft))
    apply_delta(str(tmp_path / "d"), str(base), tmp_path / "back")
    want, got = load_state(ft), load_state(tmp_path / "back")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (tmp_path / "back" / "config.json").exists()
    assert (tree_digest(base), tree_digest(ft)) == before  # inputs untouched
    # removal: ft - delta is the base again, exactly
    apply_delta(str(tmp_path / "d"), str(ft), tmp_path / "removed", scale=-1.0)
    b, r = load_state(base), load_state(tmp_path / "removed")
    assert all(torch.equal(b[k], r[k]) for k in b)


def test_extract_bf16_delta_is_float32_and_exact(llama_family, tmp_path):
    keys = load_state(llama_family["base"]).keys()
    base = edit_model(llama_family["base"], tmp_path / "base", {k: (lambda w: w.to(torch.bfloat16)) for k in keys})
    ft = edit_model(base, tmp_path / "ft", {Q0: lambda w: (w.float() + 0.01).to(torch.bfloat16)})
    extract_delta(str(ft), str(base), tmp_path / "d")
    stored = load_file(next((tmp_path / "d").glob("*.safetensors")))
    assert list(stored) == [f"{Q0}::values"] and stored[f"{Q0}::values"].dtype == torch.float32  # unchanged tensors not stored
    apply_delta(str(tmp_path / "d"), str(base), tmp_path / "back")
    assert torch.equal(load_state(tmp_path / "back")[Q0], load_state(ft)[Q0])


def test_lora_extraction_is_exact_at_the_true_rank(rank3, tmp_path):
    result = extract_lora(str(rank3["ft"]), str(rank3["base"]), tmp_path / "ad", rank=3)
    rows = {r.name: r for r in result.rows}
    assert rows[Q0].extra["rank"] == 3 and rows[Q0].error < 1e-5 and rows[NORM].kind == "modules_to_save"
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted([Q0.removesuffix(".weight"), UP1.removesuffix(".weight")])
    assert config["modules_to_save"] == ["model.norm"]
    assert config["lora_bias"] is False and config["bias"] == "none"  # a Llama has no biases: none written
    assert not any("bias" in k for k in load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    apply_delta(str(tmp_path / "ad"), str(rank3["base"]), tmp_path / "back")
    want, got = load_state(rank3["ft"]), load_state(tmp_path / "back")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    # at rank 2 the error is the discarded singular value's share, as reported
    low = extract_lora(str(rank3["ft"]), str(rank3["base"]), tmp_path / "ad2", rank=2, non_linear="skip")
    s = torch.linalg.svdvals((load_state(rank3["ft"])[Q0] - load_state(rank3["base"])[Q0]).double())
    assert {r.name: r for r in low.rows}[Q0].error == pytest.approx(float(s[2] / s.norm()), rel=1e-4)
    assert any(NORM in w for w in low.warnings)


def test_energy_picks_the_rank(rank3, tmp_path):
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])  # energies 16, 9, 4, 1 of 30
    assert (choose_rank(s, None, 16 / 30) == 1 and choose_rank(s, None, 0.83) == 2 and choose_rank(s, None, 0.84) == 3
            and choose_rank(s, None, 0.99) == 4)
    assert choose_rank(s, 2, 0.99) == 2
    result = extract_lora(str(rank3["ft"]), str(rank3["base"]), tmp_path / "ad", energy=0.9999)
    assert {r.extra["rank"] for r in result.rows if r.kind == "lowrank"} == {3}


def test_transfer_to_a_new_base_reports_drift(rank3, llama_family, tmp_path):
    extract_delta(str(rank3["ft"]), str(rank3["base"]), tmp_path / "d")
    new_base = llama_family["ft2"]  # "version 2": the same architecture, other weights
    result = apply_delta(str(tmp_path / "d"), str(new_base), tmp_path / "moved", original_base=str(rank3["base"]))
    assert any("transfer to a new base" in w for w in result.warnings)
    n, a = load_state(new_base), load_state(rank3["base"])
    drift = {d.name: d for d in result.drift}
    assert set(drift) == {Q0, UP1, NORM}
    want_cos = float(torch.nn.functional.cosine_similarity(n[Q0].double().reshape(1, -1), a[Q0].double().reshape(1, -1)))
    assert drift[Q0].cosine == pytest.approx(want_cos, rel=1e-9)
    assert drift[Q0].relative_distance == pytest.approx(float((n[Q0] - a[Q0]).double().norm() / a[Q0].double().norm()), rel=1e-9)
    got, ft = load_state(tmp_path / "moved"), load_state(rank3["ft"])
    torch.testing.assert_close(got[Q0], n[Q0] + (ft[Q0].double() - a[Q0].double()).float(), rtol=0, atol=1e-6)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], n["model.layers.0.self_attn.k_proj.weight"])


def test_bad_inputs(rank3, tmp_path):
    base, ft = rank3["base"], rank3["ft"]
    extract_delta(str(ft), str(base), tmp_path / "d")
    digests = tree_digest(base), tree_digest(ft), tree_digest(tmp_path / "d")
    other = save_llama(tmp_path / "wide", hidden_size=48, intermediate_size=64, num_attention_heads=4)
    with pytest.raises(InputError, match=r"shape \[32, 32\] in the delta, \[48, 48\] in the base"):
        apply_delta(str(tmp_path / "d"), str(other), tmp_path / "o1")
    with pytest.raises(InputError, match="not a fine-tune"):
        extract_delta(str(other), str(base), tmp_path / "o2")
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path / "mistral")
    with pytest.raises(InputError, match="the delta is for LlamaForCausalLM, the base is MistralForCausalLM"):
        apply_delta(str(tmp_path / "d"), str(tmp_path / "mistral"), tmp_path / "o3")
    for out in (base, tmp_path / "d", base / "sub"):
        with pytest.raises(OutputError, match="overwrite input|inside the folder"):
            apply_delta(str(tmp_path / "d"), str(base), out)
    with pytest.raises(OutputError, match="overwrite input|inside the folder"):
        extract_delta(str(ft), str(base), ft)
    with pytest.raises(DeltawiseError, match="--rank, --energy"):
        extract_lora(str(ft), str(base), tmp_path / "o4")
    with pytest.raises(InputError, match="neither a deltawise delta folder"):
        apply_delta(str(ft), str(base), tmp_path / "o5")
    assert (tree_digest(base), tree_digest(ft), tree_digest(tmp_path / "d")) == digests
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_cli_extract_apply(rank3, tmp_path):
    from typer.testing import CliRunner

    runner = CliRunner()
    r = runner.invoke(app, ["extract", str(rank3["ft"]), "--base", str(rank3["base"]), "-o", str(tmp_path / "ad"),
                            "--lora", "--rank", "3", "--report", str(tmp_path / "r.json"), "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert {t["name"] for t in report["tensors"]} == {Q0, UP1, NORM}
    r = runner.invoke(app, ["apply", str(tmp_path / "ad"), "--base", str(rank3["base"]), "-o", str(tmp_path / "m"),
                            "--scale", "0.5", "-q"])
    assert r.exit_code == 0, r.output
    want = load_state(rank3["base"])[Q0] + 0.5 * (load_state(rank3["ft"])[Q0] - load_state(rank3["base"])[Q0])
    torch.testing.assert_close(load_state(tmp_path / "m")[Q0], want, rtol=0, atol=1e-6)
