"""CorDA through ``train -m corda -p calibration=FILE`` (Yang et al. 2024, arXiv 2406.05223) against a hand
computation of its initialisation: W·C = U S V̂ᵀ with C the covariance of the matrix's inputs on the
calibration data; knowledge-preserved mode adapts the r smallest components, so the calibration data's
outputs move least; the saved adapter loads on the unmodified base."""

from __future__ import annotations

import json

import pytest
import torch
from adapt_util import base_model, batch_of, logits, tiny_lm, train_cfg  # noqa: F401
from transformers import set_seed

from deltawise.adapt import MethodError, get_method, run_train
from deltawise.errors import DeltawiseError
from deltawise.eval.models import load_model

TARGETS = "q_proj,v_proj"
MODULE = "model.layers.0.self_attn.q_proj"


def _calibration_inputs(tiny_lm, length: int = 256) -> list[torch.Tensor]:
    """The inputs of layer 0's q_proj on each calibration document (one forward per document, as corda runs)."""
    from deltawise.data.read import load_items
    from deltawise.eval.models import load_tokenizer

    model, tok = base_model(tiny_lm["model"]), load_tokenizer(tiny_lm["model"])
    seen = []
    handle = dict(model.named_modules())[MODULE].register_forward_hook(lambda m, i, o: seen.append(i[0][0].detach()))
    with torch.no_grad():
        for item in load_items(tiny_lm["data"]):
            model(input_ids=torch.tensor([tok(item.text, truncation=True, max_length=length)["input_ids"]]))
    handle.remove()
    return [x.double() for x in seen]


def _damping(c: torch.Tensor) -> float:
    """CorDA's damping of C: 1% of its mean diagonal, doubled until C's float32 inverse is accurate."""
    damp, c32, eye = 0.01, c.float(), torch.eye(c.shape[0])
    while True:
        fixed = c32 + eye * c32.diagonal().mean() * damp
        if torch.dist(fixed @ torch.linalg.inv(fixed), eye).item() < 0.05:
            return damp
        damp *= 2


def _hand_component(w: torch.Tensor, inputs: list[torch.Tensor], r: int, mode: str) -> torch.Tensor:
    """CorDA's initial adapter update: r components of W = U S (V̂ᵀ C⁻¹) from the SVD of W C (damped C). As in
    PEFT, each document's inputs are divided by |their largest value| before they enter C = Σ XᵀX."""
    c = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in inputs)
    c = c + torch.eye(c.shape[0], dtype=c.dtype) * c.diagonal().mean() * _damping(c)
    u, s, vh = torch.linalg.svd(w.double() @ c, full_matrices=False)
    v = vh @ torch.linalg.inv(c)
    keep = slice(-r, None) if mode == "kpm" else slice(0, r)
    return u[:, keep] @ torch.diag(s[keep]) @ v[keep]


def _prepared(tiny_lm, mode: str, r: int = 4):
    set_seed(0)
    params = {"rank": r, "targets": TARGETS, "calibration": str(tiny_lm["data"]), "mode": mode}
    return get_method("corda", params).prepare(base_model(tiny_lm["model"]), "causal_lm", 0)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_the_initial_adapter_is_the_hand_computed_component_and_the_model_equals_the_base(mode, tiny_lm):
    w = dict(base_model(tiny_lm["model"]).named_parameters())[MODULE + ".weight"].detach()
    model = _prepared(tiny_lm, mode)
    layer = dict(model.named_modules())["base_model.model." + MODULE]
    update = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    hand = _hand_component(w, _calibration_inputs(tiny_lm), 4, mode)
    torch.testing.assert_close(update.double(), hand, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(layer.base_layer.weight.detach() + update, w, atol=1e-5, rtol=1e-5)  # W_res + s·BA = W
    batch = batch_of(tiny_lm)
    torch.testing.assert_close(logits(model, batch), logits(base_model(tiny_lm["model"]), batch), atol=1e-4, rtol=1e-4)


def test_knowledge_preserved_mode_adapts_the_directions_the_calibration_data_uses_least(tiny_lm):
    x = torch.cat(_calibration_inputs(tiny_lm))
    effect = {}
    for mode in ("kpm", "ipm"):
        layer = dict(_prepared(tiny_lm, mode).named_modules())["base_model.model." + MODULE]
        update = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        # the adapter's share of W's output on the calibration inputs, per unit of its own size
        effect[mode] = float((x @ update.double().T).norm() / update.norm())
    assert effect["kpm"] < 0.5 * effect["ipm"]


def test_a_trained_corda_adapter_is_a_plain_lora_of_the_unmodified_base(tiny_lm, tmp_path):
    from peft import PeftModel

    out = tmp_path / "corda"
    run_train(train_cfg(tiny_lm, out, "corda", {"rank": 4, "targets": TARGETS, "calibration": str(tiny_lm["data"])},
                        max_steps=2))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # converted: rank 2r, relative to the original W
    batch = batch_of(tiny_lm)
    base = logits(base_model(tiny_lm["model"]), batch)
    peft_logits = logits(PeftModel.from_pretrained(base_model(tiny_lm["model"]), out), batch)
    assert not torch.allclose(peft_logits, base, atol=1e-4)  # it trained
    ours = load_model(str(out), base=str(tiny_lm["model"])).model  # deltawise reads it as a delta of the base
    torch.testing.assert_close(logits(ours, batch), peft_logits, atol=1e-5, rtol=1e-5)
    recorded = json.loads((out / "deltawise_train.json").read_text())["method_params"]
    assert recorded["mode"] == "kpm" and recorded["calibration"] == str(tiny_lm["data"])


def test_corda_without_calibration_data_is_refused(tiny_lm, tmp_path):
    with pytest.raises(MethodError, match="calibration=FILE"):
        get_method("corda", {"rank": 4}).prepare(base_model(tiny_lm["model"]), "causal_lm", 0)
    with pytest.raises(MethodError, match="kpm, ipm|one of"):
        get_method("corda", {"calibration": "x.txt", "mode": "both"})
    with pytest.raises(DeltawiseError, match="missing.txt"):
        get_method("corda", {"calibration": str(tmp_path / "missing.txt")}).prepare(base_model(tiny_lm["model"]),
                                                                                     "causal_lm", 0)
