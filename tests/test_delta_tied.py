"""Adapters of a model with tied embeddings (issue 23): the base stores no ``lm_head.weight``, the
output head is the input embedding. ``extract --lora`` must save the head too (PEFT replaces only
the module it is told to, so a saved embedding alone leaves the tied head at the base value), and
``apply`` must read an adapter that names the head (ours, or ``mergekit-extract-lora``'s) through
the tie.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from delta_util import edit_model, low_rank

from conftest import load_state, save_llama
from deltawise.delta.apply import apply_delta
from deltawise.delta.lora_extract import extract_lora
from deltawise.errors import InputError

peft = pytest.importorskip("peft")
EMBED, Q0 = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"


def causal_lm(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tied")
    base = save_llama(root / "base", seed=0, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_state(base)
    g = torch.Generator().manual_seed(5)
    ft = edit_model(base, root / "ft", {
        EMBED: lambda w: w + 0.05 * torch.randn(w.shape, generator=g),
        Q0: lambda w: w + low_rank((32, 32), 3, seed=1, scale=0.5),
    })
    return base, ft


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


def test_extracted_adapter_gives_apply_logits_in_peft(tied_pair, tmp_path):
    base, ft = tied_pair
    extract_lora(str(ft), str(base), tmp_path / "ad", energy=0.999999)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    apply_delta(str(tmp_path / "ad"), str(base), tmp_path / "applied")
    applied = load_state(tmp_path / "applied")
    assert "lm_head.weight" not in applied  # still a tied checkpoint
    torch.testing.assert_close(applied[EMBED], load_state(ft)[EMBED])
    ours = _logits(causal_lm(tmp_path / "applied"))
    in_peft = _logits(peft.PeftModel.from_pretrained(causal_lm(base), tmp_path / "ad").eval())
    torch.testing.assert_close(in_peft, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, _logits(causal_lm(ft)), rtol=1e-4, atol=1e-4)


def test_mergekit_adapter_of_a_tied_model_applies(tied_pair, tmp_path):
    base, ft = tied_pair
    exe = Path(sys.executable).with_name("mergekit-extract-lora")
    if not exe.exists():
        pytest.skip("mergekit-extract-lora is not installed")
    proc = subprocess.run(
        [str(exe), "--model", str(ft), "--base-model", str(base), "--out-path", str(tmp_path / "mk"), "--max-rank", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "mk" / "adapter_config.json").read_text())
    assert {"lm_head", "embed_tokens"} <= set(config["modules_to_save"])
    apply_delta(str(tmp_path / "mk"), str(base), tmp_path / "applied")
    ours = _logits(causal_lm(tmp_path / "applied"))
    in_peft = _logits(peft.PeftModel.from_pretrained(causal_lm(base), tmp_path / "mk").eval())
    torch.testing.assert_close(in_peft, ours, rtol=1e-4, atol=1e-5)


def test_a_tied_head_changed_unlike_its_embedding_is_refused(tied_pair, tmp_path):
    base, ft = tied_pair
    extract_lora(str(ft), str(base), tmp_path / "ad", energy=0.999999)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "ad" / "adapter_model.safetensors"
    state = load_file(weights)
    state["base_model.model.lm_head.weight"] = state["base_model.model.lm_head.weight"] + 1.0
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(InputError, match="ties them"):
        apply_delta(str(tmp_path / "ad"), str(base), tmp_path / "applied")
