"""EVA through ``train -m lora -p init=eva`` (Paischer et al. 2024, arXiv 2410.07170) against a hand computation
of its initialisation: each LoRA A starts as the top right-singular vectors of its layer's centred inputs on the
training batches, B = 0 (the model equals the base), and the rank budget r·layers goes to the components of
largest explained variance ratio across layers (at most round(ρ·r) per layer); the saved adapter (rank_pattern,
alpha_pattern) loads in PEFT and reads in deltawise as the same delta."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from adapt_util import base_model, batch_of, logits, tiny_lm, train_cfg  # noqa: F401
from typer.testing import CliRunner

from deltawise.adapt import MethodError, get_method, run_train

TARGETS = "q_proj,down_proj"  # different inputs per module: no two layers share one SVD
EVA = {"rank": 2, "alpha": 4, "targets": TARGETS, "init": "eva", "eva_rho": 4}


def _layer_inputs(tiny_lm, batch) -> dict[str, torch.Tensor]:
    """Each target module's inputs on ``batch`` at the tokens EVA reads (attention mask and label mask)."""
    model, seen = base_model(tiny_lm["model"]), {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
             for n, m in model.named_modules() if n.endswith(tuple(TARGETS.split(",")))]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    keep = batch["attention_mask"].bool() & (batch["labels"] != -100)
    return {n: x[keep].double() for n, x in seen.items()}


def _hand_eva(inputs: dict[str, torch.Tensor], rank: int, rho: float) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """EVA's ranks and right-singular vectors: SVD of each layer's centred inputs; the r·layers components of
    largest explained variance ratio S_i²/ΣS², at most round(ρ·r) per layer, decide each layer's rank."""
    vectors, ratios = {}, []
    for name, x in inputs.items():
        _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        vectors[name] = vh
        ratios += [(float(v), name) for v in (s**2 / (s**2).sum())[: round(rank * rho)]]
    top = Counter(name for _, name in sorted(ratios, reverse=True)[: rank * len(inputs)])
    return {name: top[name] for name in inputs}, vectors


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_eva_starts_a_at_the_top_singular_vectors_of_the_layer_inputs_with_ranks_by_explained_variance(tiny_lm):
    batch = batch_of(tiny_lm)  # the whole data file as one batch: every SVD step sees the same inputs
    method = get_method("lora", EVA)
    model = method.prepare(base_model(tiny_lm["model"]), "causal_lm", 0)
    method.initialise(model, [batch], None, None)
    ranks, vectors = _hand_eva(_layer_inputs(tiny_lm, batch), rank=2, rho=4)
    assert len(set(ranks.values())) > 1 and sum(ranks.values()) == 2 * len(ranks)  # redistributed, budget kept
    assert method.record()["eva_ranks"] == ranks
    config = model.peft_config["default"]
    assert config.rank_pattern == {n: k for n, k in ranks.items() if k != 2}
    assert config.alpha_pattern == {n: 4 * k / 2 for n, k in ranks.items() if k != 2}  # every layer keeps α/r = 2
    for name, layer in _lora_layers(model).items():
        a = layer.lora_A["default"].weight.detach().double()
        k = ranks[name]
        assert a.shape[0] == k and layer.scaling["default"] == pytest.approx(2.0), name
        torch.testing.assert_close((a @ vectors[name][:k].T).abs(), torch.eye(k, dtype=a.dtype), atol=1e-4, rtol=0)
        assert not layer.lora_B["default"].weight.any()
    torch.testing.assert_close(logits(model, batch), logits(base_model(tiny_lm["model"]), batch))


def test_eva_whitening_divides_each_row_by_the_root_of_its_singular_value(tiny_lm):
    batch = batch_of(tiny_lm)
    plain, white = (get_method("lora", {**EVA, "eva_whiten": w}) for w in (False, True))
    models = [m.prepare(base_model(tiny_lm["model"]), "causal_lm", 0) for m in (plain, white)]
    for method, model in zip((plain, white), models):
        method.initialise(model, [batch], None, None)
    inputs = _layer_inputs(tiny_lm, batch)
    for (name, p), w in zip(_lora_layers(models[0]).items(), _lora_layers(models[1]).values()):
        a, aw = p.lora_A["default"].weight.detach().double(), w.lora_A["default"].weight.detach().double()
        x = inputs[name]
        # the singular values of all the inputs PEFT's SVD read: the batch twice (the second pass tells it converged)
        s = torch.linalg.svdvals(torch.cat([x, x]) - x.mean(0))[: a.shape[0]]
        torch.testing.assert_close(aw, a / s.sqrt()[:, None], atol=1e-6, rtol=1e-4)


def test_a_trained_eva_adapter_loads_in_peft_and_reads_in_deltawise_as_the_same_delta(tiny_lm, tmp_path):
    from peft import PeftModel

    from deltawise.delta.source import open_delta
    from deltawise.eval.models import load_model

    out = tmp_path / "eva"
    notes: list[str] = []
    run_train(train_cfg(tiny_lm, out, "lora", {**EVA, "eva_batches": 1}, batch_size=4, max_steps=2, progress=True),
              note=notes.append)
    assert any(line.startswith("EVA: SVD of the inputs of 4 layers on up to 1 training batches") for line in notes)
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = json.loads((out / "deltawise_train.json").read_text())["method_record"]["eva_ranks"]
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"] == {n: k for n, k in ranks.items() if k != 2}
    peft = PeftModel.from_pretrained(base_model(tiny_lm["model"]), out)
    assert {n: m.lora_A["default"].weight.shape[0] for n, m in _lora_layers(peft).items()} == ranks
    batch = batch_of(tiny_lm)
    base = base_model(tiny_lm["model"])
    peft_logits = logits(peft, batch)
    assert not torch.allclose(peft_logits, logits(base, batch), atol=1e-4)  # it trained
    merged = dict(peft.merge_and_unload().named_parameters())
    w0 = dict(base.named_parameters())
    source = open_delta(out)
    assert sorted(source.names()) == sorted(f"{n}.weight" for n in ranks)
    for name in source.names():  # merged model = base + the delta deltawise reads, module by module
        torch.testing.assert_close(merged[name].detach(), w0[name].detach() + source.get(name).materialize(),
                                   atol=1e-6, rtol=1e-5, msg=name)
    ours = load_model(str(out), base=str(tiny_lm["model"])).model
    torch.testing.assert_close(logits(ours, batch), peft_logits, atol=1e-5, rtol=1e-5)


def test_eva_on_a_classifier_reads_the_token_inputs_and_trains_the_head(tiny_lm):
    batch = batch_of(tiny_lm, "classification", tiny_lm["cls"])  # one label per sequence, not per token
    method = get_method("lora", {"rank": 2, "init": "eva"})
    model = method.prepare(base_model(tiny_lm["model"], "classification", 2), "classification", 0)
    method.initialise(model, [batch], None, None)
    assert sum(method.record()["eva_ranks"].values()) == 2 * 4  # q_proj, v_proj of 2 layers
    assert any("score" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("params,message", [
    ({"init": "eva", "eva_rho": 0.5}, r"lora: eva_rho=0.5 is outside \[1.0, inf\)"),
    ({"init": "eva", "eva_tau": 1}, r"lora: eva_tau=1.0 is outside \[0.0, 1.0\)"),
    ({"init": "eva", "eva_batches": 0}, r"lora: eva_batches=0 is outside \[1, inf\)"),
    ({"init": "pca"}, r"lora: init must be one of kaiming, eva; got 'pca'"),
    ({"eva_rho": 3}, r"eva_rho is an EVA setting: add -p init=eva"),
])
def test_a_bad_eva_parameter_is_refused(params, message):
    with pytest.raises(MethodError, match=message):
        get_method("lora", params)


def test_eva_is_lora_s_alone_and_refused_on_the_command_line_before_training(tiny_lm, tmp_path):
    from deltawise.cli import app

    for method in ("pissa", "dora", "lora_fa"):
        with pytest.raises(MethodError, match="has no parameter 'init'"):
            get_method(method, {"init": "eva"})
    res = CliRunner().invoke(app, ["train", str(tiny_lm["model"]), "--data", str(tiny_lm["data"]), "-o", str(tmp_path / "o"),
                                   "-p", "init=eva", "-p", "eva_rho=0.5", "--quiet"])
    assert res.exit_code != 0 and "eva_rho=0.5 is outside [1.0, inf)" in res.output + str(res.exception)
    assert not (tmp_path / "o").exists()


def test_an_svd_that_cannot_step_or_converge_is_an_error_not_an_endless_loop(tiny_lm, monkeypatch):
    from deltawise.adapt.methods import eva

    batch = batch_of(tiny_lm)
    short = {k: v[:1] for k, v in batch.items()}  # one short document: fewer tokens than ρ·r = 16 components
    assert int(short["attention_mask"].sum()) < 16 <= int(batch["attention_mask"].sum())
    method = get_method("lora", {"rank": 8, "init": "eva"})
    with pytest.raises(MethodError, match=r"every batch holds fewer tokens than rho·rank = 16 components"):
        method.initialise(method.prepare(base_model(tiny_lm["model"]), "causal_lm", 0), [short, short], None, None)
    monkeypatch.setattr(eva, "MAX_STEPS", 3)  # two different batches in turn: tau 0.9999 takes more than 3 steps
    method = get_method("lora", {"rank": 2, "init": "eva", "eva_tau": 0.9999})
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    with pytest.raises(MethodError, match=r"did not converge in 3 batches; lower -p eva_tau \(now 0.9999\)"):
        method.initialise(method.prepare(base_model(tiny_lm["model"]), "causal_lm", 0), halves, None, None)
