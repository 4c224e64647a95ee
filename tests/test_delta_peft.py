"""PEFT interop: adapters we write load in PEFT with the same logits as our applied weights;
adapters PEFT writes (LoRA with rsLoRA/alpha_pattern/modules_to_save, FourierFT) apply like
PEFT's own merge_and_unload()."""

from __future__ import annotations

import json

import pytest
import torch
from delta_util import edit_model, low_rank

from deltawise.delta.apply import apply_delta
from deltawise.delta.lora_extract import extract_lora
from deltawise.errors import InputError
from conftest import load_state, tree_digest

peft = pytest.importorskip("peft")
Q0, V1, NORM = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight", "model.norm.weight"


def causal_lm(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def tokens():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_our_adapter_loads_in_peft_with_the_same_logits(llama_family, tmp_path):
    base = llama_family["base"]
    ft = edit_model(base, tmp_path / "ft", {
        Q0: lambda w: w + low_rank((32, 32), 3, seed=1, scale=0.5),
        V1: lambda w: w + low_rank((16, 32), 2, seed=2, scale=0.5),
        NORM: lambda w: w * 1.5,
    })
    result = extract_lora(str(ft), str(base), tmp_path / "ad", energy=0.999999)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["modules_to_save"] == ["model.norm"]  # mixed ranks: 3 and 2
    assert sorted(r.extra.get("rank", 0) for r in result.rows) == [0, 2, 3]
    apply_delta(str(tmp_path / "ad"), str(base), tmp_path / "merged")
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(causal_lm(base), tmp_path / "ad").eval()
        ours = causal_lm(tmp_path / "merged")
        want = causal_lm(ft)
        x = tokens()
        peft_logits, our_logits = peft_model(x).logits, ours(x).logits
    torch.testing.assert_close(peft_logits, our_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our_logits, want(x).logits, rtol=1e-4, atol=1e-4)  # exact rank: the fine-tune itself
    assert not torch.allclose(our_logits, causal_lm(base)(x).logits, atol=1e-3)  # the adapter does change the model


def _peft_made(base, folder, config, seed=0):
    model = peft.get_peft_model(causal_lm(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # lora_B is zero at init, FourierFT spectra and modules_to_save copies: randomise all
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_peft_lora_adapter_applies_like_merge_and_unload(llama_family, tmp_path):
    base = llama_family["base"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             alpha_pattern={"down_proj": 2}, rank_pattern={"down_proj": 2}, modules_to_save=["model.norm"])
    want = _peft_made(base, tmp_path / "ad", config)
    digest = tree_digest(tmp_path / "ad")
    apply_delta(str(tmp_path / "ad"), str(base), tmp_path / "ours")
    got = load_state(tmp_path / "ours")
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    b = load_state(base)
    assert not torch.allclose(got["model.layers.1.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"])
    assert not torch.equal(got[NORM], b[NORM])
    assert tree_digest(tmp_path / "ad") == digest


def test_peft_fourierft_adapter_is_a_spectral_delta(llama_family, tmp_path):
    base = llama_family["base"]
    config = peft.FourierFTConfig(n_frequency=40, scaling=50.0, target_modules=["q_proj", "up_proj"], init_weights=False)
    want = _peft_made(base, tmp_path / "ad", config)
    result = apply_delta(str(tmp_path / "ad"), str(base), tmp_path / "ours")
    assert {r.kind for r in result.rows} == {"spectral"}
    got = load_state(tmp_path / "ours")
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_dora_applies_like_merge_and_unload(llama_family, tmp_path):
    """DoRA is read as the dense delta it induces: m / ||W + s·BA||_row · (W + s·BA) - W."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    want = _peft_made(llama_family["base"], tmp_path / "ad", config)
    result = apply_delta(str(tmp_path / "ad"), str(llama_family["base"]), tmp_path / "ours")
    assert {r.kind for r in result.rows} == {"dense"}
    got, base = load_state(tmp_path / "ours"), load_state(llama_family["base"])
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(got[Q0], base[Q0], atol=1e-3)


def test_embedding_lora_with_its_saved_base_layer_applies_like_merge_and_unload(llama_family, tmp_path):
    """PEFT saves the embedding's base layer beside lora_embedding_A/B: it is that embedding's value."""
    config = peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])
    want = _peft_made(llama_family["base"], tmp_path / "ad", config)
    apply_delta(str(tmp_path / "ad"), str(llama_family["base"]), tmp_path / "ours")
    got, base = load_state(tmp_path / "ours"), load_state(llama_family["base"])
    assert set(got) == set(base)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"], atol=1e-3)


def test_kasa_adapter_is_refused(llama_family, tmp_path):
    from peft.tuners.lora.config import KasaConfig

    config = peft.LoraConfig(r=2, target_modules=["q_proj"], kasa_config=KasaConfig())
    _peft_made(llama_family["base"], tmp_path / "ad", config)
    with pytest.raises(InputError, match="kasa_config"):
        apply_delta(str(tmp_path / "ad"), str(llama_family["base"]), tmp_path / "o")
