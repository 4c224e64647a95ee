"""Adapters in, adapter out (``merge --output-format adapter``): the written PEFT adapter, loaded by PEFT
itself, equals the dense merge -- exactly for linear / task arithmetic of LoRAs (concatenated factors),
within the reported error for SVD -- and each input kind PEFT's own add_weighted_adapter gets wrong
(rsLoRA, rank_pattern/alpha_pattern, lora_bias, DoRA) is merged as its dense definition says; inputs
that cannot make one adapter are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import load_state, perturb, save_llama
from deltawise.cli import app
from deltawise.errors import DeltawiseError, RecipeError
from deltawise.merge import merge

peft = pytest.importorskip("peft")
Q0 = "model.layers.0.self_attn.q_proj.weight"


def causal_lm(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_made(base: Path, folder: Path, config, seed: int) -> dict[str, torch.Tensor]:
    """An adapter made by PEFT with every trainable tensor randomised; returns PEFT's merge_and_unload state."""
    model = peft.get_peft_model(causal_lm(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    """A tiny Llama with attention biases, and PEFT adapters of it: plain LoRA, rsLoRA with rank/alpha
    patterns, DoRA, lora_bias; each with PEFT's own dense delta (merge_and_unload - base)."""
    root = tmp_path_factory.mktemp("adapters")
    base = save_llama(root / "base", attention_bias=True)
    base_state = load_state(base)
    configs = {
        "plain": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "rslora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True,
                                  rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}),
        "dora": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], use_dora=True),
        "bias": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], lora_bias=True),
    }
    deltas = {}
    for i, (name, config) in enumerate(configs.items()):
        merged = peft_made(base, root / name, config, seed=i + 1)
        deltas[name] = {k: merged[k] - base_state[k] for k in base_state}
    return {"root": root, "base": base, "base_state": base_state, "deltas": deltas}


def recipe(adapters, method: str, models: dict[str, float], adapter=None, **parameters) -> dict:
    entries = [{"model": str(adapters["root"] / m), "parameters": {"weight": w}} for m, w in models.items()]
    out = {"merge_method": method, "base_model": str(adapters["base"]), "models": entries, "parameters": parameters}
    return out if adapter is None else {**out, "adapter": adapter}


def peft_delta(adapters, folder: Path) -> dict[str, torch.Tensor]:
    """The dense delta of an adapter folder as PEFT computes it (load, merge_and_unload, minus the base)."""
    merged = peft.PeftModel.from_pretrained(causal_lm(adapters["base"]), folder).merge_and_unload().state_dict()
    return {k: merged[k] - v for k, v in adapters["base_state"].items()}


def sidecar(folder: Path) -> dict:
    return json.loads((folder / "deltawise.json").read_text())


def test_task_arithmetic_of_loras_is_the_exact_sum_of_peft_deltas(adapters, tmp_path):
    weights = {"plain": 0.7, "rslora": -0.4}
    result = merge(recipe(adapters, "task_arithmetic", weights, adapter={}, **{"lambda": 1.5}), tmp_path / "ad")
    report = sidecar(tmp_path / "ad")
    assert result.exact and report["exactness"] == "exact" and report["total_relative_error"] == 0.0
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    # ranks summed per module: q_proj 4 + 4, v_proj 4, down_proj 2 (rank_pattern), each at scale 1
    ranks = {r["tensor"]: r["rank"] for r in report["tensors"]}
    assert ranks[Q0] == 8 and ranks["model.layers.1.mlp.down_proj.weight"] == 2
    assert ranks["model.layers.0.self_attn.v_proj.weight"] == 4
    assert config["r"] == config["lora_alpha"] and not config["use_rslora"]
    got = peft_delta(adapters, tmp_path / "ad")
    deltas = adapters["deltas"]
    for name, value in got.items():  # the dense definition, from PEFT's own merge of each input
        want = 1.5 * sum(w * deltas[m][name] for m, w in weights.items())
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=name)
    assert got["model.layers.1.mlp.down_proj.weight"].abs().max() > 1e-3  # the rsLoRA/pattern module did change


def test_linear_adapter_runs_in_peft_like_the_full_merge(adapters, tmp_path):
    models = {"plain": 1.0, "rslora": 3.0}
    merge(recipe(adapters, "linear", models, adapter=True), tmp_path / "ad")
    merge(recipe(adapters, "linear", models), tmp_path / "full")
    assert sidecar(tmp_path / "ad")["exactness"] == "exact"
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = peft.PeftModel.from_pretrained(causal_lm(adapters["base"]), tmp_path / "ad").eval()(x).logits
        full = causal_lm(tmp_path / "full")(x).logits
        base = causal_lm(adapters["base"])(x).logits
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)
    # linear with base_model averages the base in: weights 1, 3 and 1 (the base) give c = 1/5, 3/5
    got, deltas = peft_delta(adapters, tmp_path / "ad"), adapters["deltas"]
    torch.testing.assert_close(got[Q0], deltas["plain"][Q0] / 5 + 3 * deltas["rslora"][Q0] / 5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_sparsifying_merges_are_written_by_svd_within_the_reported_error(adapters, tmp_path, method):
    models = {"plain": 1.0, "rslora": 1.0}
    merge(recipe(adapters, method, models, density=0.5), tmp_path / "full")
    merge(recipe(adapters, method, models, adapter={"rank": 3}, density=0.5), tmp_path / "ad")
    report = sidecar(tmp_path / "ad")
    assert report["exactness"] == "svd" and 0 < report["total_relative_error"] < 1
    full, base = load_state(tmp_path / "full"), adapters["base_state"]
    got = peft_delta(adapters, tmp_path / "ad")
    lost = total = 0.0
    for row in report["tensors"]:
        name = row["tensor"]
        want = full[name].double() - base[name].double()
        error = float((got[name].double() - want).norm() / want.norm())
        assert row["how"] == "svd" and row["rank"] == 3
        # the reported error is the real one, and is Eckart-Young's: the tail of the singular values
        assert error == pytest.approx(row["relative_error"], abs=2e-5), name
        s = torch.linalg.svdvals(want)
        assert row["relative_error"] == pytest.approx(float(s[3:].norm() / s.norm()), abs=1e-5)
        lost, total = lost + (error * float(want.norm())) ** 2, total + float(want.norm()) ** 2
    assert report["total_relative_error"] == pytest.approx((lost / total) ** 0.5, abs=2e-5)
    changed = {n for n in base if not torch.equal(full[n], base[n])}
    assert changed == {r["tensor"] for r in report["tensors"]}  # every tensor the merge changes is in the adapter


@pytest.mark.parametrize("method", ["breadcrumbs", "model_stock", "karcher", "pcb"])
def test_at_full_rank_any_tensorwise_method_gives_the_full_merge(adapters, tmp_path, method):
    plain = recipe(adapters, method, {"plain": 1.0, "rslora": 1.0})
    for entry in plain["models"]:
        entry["parameters"] = {}
    merge(plain, tmp_path / "full")
    result = merge({**plain, "adapter": {"energy": 1.0}}, tmp_path / "ad")
    want, base = load_state(tmp_path / "full"), adapters["base_state"]
    got = peft_delta(adapters, tmp_path / "ad")
    for name in base:
        torch.testing.assert_close(got[name], want[name] - base[name], rtol=1e-4, atol=2e-6, msg=name)
    assert result.rows and result.total_relative_error < 1e-5


def test_dora_input_is_its_induced_dense_delta(adapters, tmp_path):
    """DoRA rescales rows of W + s·BA: not a LoRA, so the sum goes through SVD (full rank: no loss)."""
    models = {"dora": 1.0, "plain": 0.5}
    merge(recipe(adapters, "task_arithmetic", models, adapter={"energy": 1.0}), tmp_path / "ad")
    report = sidecar(tmp_path / "ad")
    rows = {r["tensor"]: r for r in report["tensors"]}
    assert rows[Q0]["how"] == "svd" and rows["model.layers.0.self_attn.v_proj.weight"]["how"] == "concat"
    got, deltas = peft_delta(adapters, tmp_path / "ad"), adapters["deltas"]
    for name, value in got.items():
        want = deltas["dora"][name] + 0.5 * deltas["plain"][name]
        torch.testing.assert_close(value, want, rtol=1e-4, atol=2e-6, msg=name)
    assert deltas["dora"]["model.layers.1.self_attn.o_proj.weight"].abs().max() > 1e-3


def test_lora_bias_input_changes_the_bias_by_scale_times_bias(adapters, tmp_path):
    merge(recipe(adapters, "task_arithmetic", {"bias": 2.0}, adapter={}), tmp_path / "ad")
    got, want = peft_delta(adapters, tmp_path / "ad"), adapters["deltas"]["bias"]
    bias = "model.layers.1.self_attn.k_proj.bias"
    assert want[bias].abs().max() > 1e-3  # PEFT's own merge moves the bias
    for name in want:
        torch.testing.assert_close(got[name], 2.0 * want[name], rtol=1e-5, atol=1e-6, msg=name)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    # every LoRA module (q_proj, k_proj) has a base bias here, so the bias stays a LoRA bias
    assert config["lora_bias"] is True and not config["modules_to_save"]
    assert sidecar(tmp_path / "ad")["exactness"] == "exact"


def test_lora_bias_beside_bias_free_layers_saves_those_modules_whole(adapters, tmp_path):
    result = merge(recipe(adapters, "task_arithmetic", {"bias": 1.0, "rslora": 1.0}, adapter={}), tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["lora_bias"] is False and "model.layers.0.self_attn.k_proj" in config["modules_to_save"]
    assert any("saved whole" in w for w in result.warnings)
    got, deltas = peft_delta(adapters, tmp_path / "ad"), adapters["deltas"]
    for name in got:
        torch.testing.assert_close(got[name], deltas["bias"][name] + deltas["rslora"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_full_model_input_needs_base_model_and_then_merges(adapters, tmp_path):
    ft = perturb(adapters["base"], tmp_path / "ft", seed=5, scale=0.01)
    mixed = {"merge_method": "linear", "models": [{"model": str(adapters["root"] / "plain")}, {"model": str(ft)}],
             "adapter": {"energy": 1.0}}
    with pytest.raises(RecipeError, match="full model and the recipe has no base_model"):
        merge(mixed, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with_base = {**mixed, "merge_method": "task_arithmetic", "base_model": str(adapters["base"])}
    result = merge(with_base, tmp_path / "ad")
    full = {k: v for k, v in with_base.items() if k != "adapter"}
    merge(full, tmp_path / "full")
    want, base = load_state(tmp_path / "full"), adapters["base_state"]
    got = peft_delta(adapters, tmp_path / "ad")
    for name in base:  # norms and embeddings saved whole, linear weights at full rank
        torch.testing.assert_close(got[name], want[name] - base[name], rtol=1e-4, atol=1e-5, msg=name)
    assert result.summary()["modules_to_save_tensors"] > 0


def test_a_merge_that_moves_untouched_tensors_writes_them_too(adapters, tmp_path):
    """linear with normalize: false and weights 1 + 1 (the adapter and the base) doubles the base: every
    tensor changes, and the adapter must say so (norms and embeddings whole, linear weights at full rank)."""
    scaled = recipe(adapters, "linear", {"plain": 1.0}, normalize=False)
    merge(scaled, tmp_path / "full")
    merge({**scaled, "adapter": {"energy": 1.0}}, tmp_path / "ad")
    want, base = load_state(tmp_path / "full"), adapters["base_state"]
    got = peft_delta(adapters, tmp_path / "ad")
    for name in base:
        torch.testing.assert_close(got[name], want[name] - base[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.allclose(got["model.norm.weight"], base["model.norm.weight"])  # the base, once more


def test_full_model_writers_refuse_a_recipe_that_asks_for_an_adapter(adapters, tmp_path):
    from deltawise.merge import build_plan, parse_recipe, run_merge

    plan = build_plan(parse_recipe(recipe(adapters, "linear", {"plain": 1.0}, adapter={})))
    with pytest.raises(RecipeError, match="adapter"):
        run_merge(plan, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_adapters_of_different_bases_are_refused(adapters, tmp_path):
    other = save_llama(tmp_path / "other", seed=7, attention_bias=True)
    peft_made(other, tmp_path / "foreign", peft.LoraConfig(r=2, target_modules=["q_proj"]), seed=9)
    pair = [{"model": str(adapters["root"] / "plain")}, {"model": str(tmp_path / "foreign")}]
    with pytest.raises(RecipeError, match="different bases"):  # each read against the base it records
        merge({"merge_method": "linear", "models": pair, "adapter": {}}, tmp_path / "o1")
    with pytest.raises(RecipeError, match="different bases"):  # one base_model for both: the records still differ
        merge({"merge_method": "linear", "base_model": str(adapters["base"]), "models": pair, "adapter": {}}, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_non_exact_merge_without_rank_or_energy_is_refused(adapters, tmp_path):
    with pytest.raises(RecipeError, match="--adapter-rank or --adapter-energy"):
        merge(recipe(adapters, "ties", {"plain": 1.0, "rslora": 1.0}, adapter={}, density=0.5), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_flag_and_recipe_key_must_agree(adapters, tmp_path):
    runner = CliRunner()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(adapters, "ties", {"plain": 1.0, "rslora": 1.0}, adapter={"rank": 4}, density=0.5)))
    disagree = runner.invoke(app, ["merge", str(path), str(tmp_path / "o1"), "--adapter-rank", "2", "-q"])
    assert isinstance(disagree.exception, DeltawiseError) and "disagrees" in str(disagree.exception)
    model = runner.invoke(app, ["merge", str(path), str(tmp_path / "o2"), "--output-format", "model", "-q"])
    assert isinstance(model.exception, DeltawiseError) and "--output-format model" in str(model.exception)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    ok = runner.invoke(app, ["merge", str(path), str(tmp_path / "o3"), "--adapter-rank", "4", "-q"])
    assert ok.exit_code == 0, ok.output
    assert "total relative error" in ok.output and (tmp_path / "o3" / "adapter_model.safetensors").is_file()
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(recipe(adapters, "linear", {"plain": 1.0})))
    flag = runner.invoke(app, ["merge", str(plain), str(tmp_path / "o4"), "--output-format", "adapter", "-q"])
    assert flag.exit_code == 0, flag.output
    assert "exact" in flag.output and sidecar(tmp_path / "o4")["exactness"] == "exact"


def test_a_weight_cut_by_svd_and_saved_whole_with_its_module_reports_its_cut(adapters, tmp_path):
    # ties is not a sum of factors: every changed weight is cut to rank 1; k_proj's bias change next to bias-free
    # LoRA layers saves k_proj whole, so its weight goes into modules_to_save as the rank-1 cut
    models = {"bias": 1.0, "rslora": 1.0}
    merge(recipe(adapters, "ties", models, adapter={"rank": 1}, density=1.0), tmp_path / "ad")
    merge(recipe(adapters, "ties", models, density=1.0), tmp_path / "dense")
    rows = {r["tensor"]: r for r in sidecar(tmp_path / "ad")["tensors"]}
    k = "model.layers.0.self_attn.k_proj.weight"
    assert rows[k]["how"] == "full"
    got = peft_delta(adapters, tmp_path / "ad")[k]
    want = load_state(tmp_path / "dense")[k] - adapters["base_state"][k]
    measured = float((got - want).norm() / want.norm())
    assert measured > 0.05  # the cut is real
    assert rows[k]["relative_error"] == pytest.approx(measured, rel=1e-3)
