"""rsLoRA through ``train -p rslora=true`` (Kalajdzievski 2023, arXiv 2312.03732): the update is scaled by
alpha/sqrt(rank), in PEFT's model, in the saved adapter and in deltawise's reading of that adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from adapt_util import base_model, batch_of, logits, tiny_lm, train_cfg  # noqa: F401
from safetensors.torch import load_file

from deltawise.adapt import get_method, run_train
from deltawise.delta.source import open_delta
from deltawise.eval.models import load_model

Q = "model.layers.0.self_attn.q_proj.weight"


def test_rslora_is_off_by_default_and_parsed_from_the_command_line():
    assert get_method("lora").values["rslora"] is False
    assert get_method("lora", {"rslora": "true"}).values["rslora"] is True
    assert get_method("lora", {"rslora": "true"}).peft_config("causal_lm", 0).use_rslora is True
    assert get_method("dora", {"rslora": "true"}).peft_config("causal_lm", 0).use_rslora is True


@pytest.mark.parametrize("rslora", [True, False])
def test_a_trained_rslora_adapter_is_scaled_by_alpha_over_sqrt_rank_everywhere(rslora, tiny_lm, tmp_path):
    from peft import PeftModel

    out = tmp_path / "ad"
    run_train(train_cfg(tiny_lm, out, "lora", {"rank": 4, "alpha": 8, "rslora": str(rslora).lower(),
                                               "targets": "q_proj,v_proj"}, max_steps=2))
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is rslora
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    tensors = load_file(out / "adapter_model.safetensors")
    a = next(v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    assert b.abs().max() > 0  # trained: B left its zero init
    # deltawise's reading of the adapter (what eval, merge and repair see) is scale * B A
    source = open_delta(out, base_reader=None)
    torch.testing.assert_close(source.get(Q).materialize(), scale * (b @ a), atol=1e-6, rtol=1e-6)
    # and the model deltawise builds from it gives PEFT's own logits
    batch = batch_of(tiny_lm)
    peft_model = PeftModel.from_pretrained(base_model(tiny_lm["model"]), out)
    ours = load_model(str(out), base=str(tiny_lm["model"])).model
    torch.testing.assert_close(logits(ours, batch), logits(peft_model, batch), atol=1e-5, rtol=1e-5)


def test_lora_fa_hands_rslora_to_its_optimizer(tiny_lm, tmp_path, monkeypatch):
    """LoRA-FA's gradient correction divides by s²: the optimizer must know s = alpha/sqrt(rank)."""
    import peft.optimizers

    seen = {}
    real = peft.optimizers.create_lorafa_optimizer

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(peft.optimizers, "create_lorafa_optimizer", spy)
    run_train(train_cfg(tiny_lm, tmp_path / "fa", "lora_fa", {"rank": 4, "rslora": "true"}))
    assert seen["use_rslora"] is True
    assert json.loads((tmp_path / "fa" / "adapter_config.json").read_text())["use_rslora"] is True
