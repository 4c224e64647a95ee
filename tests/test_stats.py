"""Data loading, `deltawise fisher` and `deltawise gram` on tiny models, and the fisher/regmean merges end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from stats_util import TEXTS, dd  # noqa: F401
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import load_state
from deltawise.cli import app
from deltawise.data.tasks import load_data
from deltawise.errors import DeltawiseError, InputError, OutputError
from deltawise.merge import merge


def cli(*args):
    result = CliRunner().invoke(app, [*map(str, args), "--quiet"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_data_formats_and_task_detection(dd, tmp_path):
    assert load_data(dd["labelled"]).task == "classification"
    text = load_data(dd["text"])
    assert text.task == "causal_lm" and [i.text for i in text.items] == TEXTS
    from datasets import Dataset

    Dataset.from_list([{"text": "a b", "label": 1}, {"text": "c", "label": 0}]).save_to_disk(str(tmp_path / "ds"))
    ds = load_data(tmp_path / "ds")
    assert ds.task == "classification" and [i.fields["label"] for i in ds.items] == [1, 0]
    (tmp_path / "x.csv").write_text("text,label\na,1\n")
    with pytest.raises(InputError, match="unsupported dataset format"):
        load_data(tmp_path / "x.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="not a `datasets` folder"):
        load_data(tmp_path / "folder")
    (tmp_path / "nolabel.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(InputError, match="needs labelled data"):
        load_data(tmp_path / "nolabel.jsonl", need_labels=True)


def _direct_fisher_classification(folder, texts):
    """F = mean_n sum_y p(y|x_n) (d log p(y|x_n))^2, with per-example Jacobians from torch.func."""
    from torch.func import functional_call, jacrev

    from deltawise.eval.models import load_model

    lm = load_model(folder, "classification")
    model = lm.model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for text in texts:
        ids = torch.tensor([lm.tokenizer(text)["input_ids"]])

        def logp(ps):
            return torch.log_softmax(functional_call(model, ps, (ids,)).logits[0], -1)

        jac = jacrev(logp)(params)
        p = logp(params).exp()
        for n in total:
            total[n] += (p.view(-1, *[1] * params[n].dim()) * jac[n] ** 2).sum(0)
    return {n: t / len(texts) for n, t in total.items()}


def test_exact_fisher_equals_a_direct_per_example_computation(dd, tmp_path):
    out = tmp_path / "f.safetensors"
    cli("fisher", dd["cls1"], "--data", dd["labelled"], "-o", out)
    got = load_file(out)
    want = _direct_fisher_classification(dd["cls1"], TEXTS)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-9)
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["variant"] == "exact" and json.loads(meta["examples"]) == len(TEXTS)
    assert meta["deltawise_statistics"] == "fisher" and len(meta["model_fingerprint"]) == 64
    assert math.isclose(json.loads(meta["sq_norm"]), sum(float(t.double().square().sum()) for t in got.values()), rel_tol=1e-9)


def test_lm_empirical_fisher_equals_squared_gradients_of_mean_log_likelihood(dd, tmp_path):
    from torch.func import functional_call, grad

    from deltawise.eval.models import load_model

    out = tmp_path / "f.safetensors"
    cli("fisher", dd["lm1"], "--data", dd["text"], "-o", out, "--max-examples", 3)
    got = load_file(out)
    lm = load_model(dd["lm1"])
    model = lm.model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for text in TEXTS[:3]:
        ids = torch.tensor([lm.tokenizer(text)["input_ids"] + [lm.tokenizer.eos_token_id]])

        def mean_ll(ps):
            logits = functional_call(model, ps, (ids,)).logits[0, :-1]
            return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).mean()

        for n, g in grad(mean_ll)(params).items():
            want[n] += g**2 / 3
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-10)


def test_fisher_refusals(dd, tmp_path):
    with pytest.raises(OutputError, match="inside the model folder"):
        cli("fisher", dd["cls1"], "--data", dd["labelled"], "-o", dd["cls1"] / "f.safetensors")
    with pytest.raises(InputError, match="does not apply"):
        cli("fisher", dd["lm1"], "--data", dd["text"], "-o", tmp_path / "f.safetensors", "--variant", "exact")
    (tmp_path / "u.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(InputError, match="needs a 'label'"):
        cli("fisher", dd["cls1"], "--data", tmp_path / "u.jsonl", "-o", tmp_path / "g.safetensors", "--task", "classification",
            "--variant", "empirical")
    assert not list(tmp_path.glob("*.safetensors"))


def test_fisher_merge_end_to_end_matches_the_formula(dd, tmp_path):
    fishers = []
    for name in ("cls1", "cls2"):
        fishers.append(tmp_path / f"{name}.safetensors")
        cli("fisher", dd[name], "--data", dd["labelled"], "-o", fishers[-1], "--variant", "sampled", "--seed", "3")
    recipe = {"merge_method": "fisher", "models": [
        {"model": str(dd["cls1"]), "parameters": {"fisher": str(fishers[0]), "weight": 1.0}},
        {"model": str(dd["cls2"]), "parameters": {"fisher": str(fishers[1]), "weight": 2.0}}]}
    merge(recipe, tmp_path / "out")
    merged = load_state(tmp_path / "out")
    states = [load_state(dd["cls1"]), load_state(dd["cls2"])]
    fs = [load_file(f) for f in fishers]
    norms = [math.sqrt(sum(float(t.double().square().sum()) for t in f.values())) for f in fs]
    for name, value in merged.items():
        a = [(f[name] / n).clamp(min=1e-6) * w for f, n, w in zip(fs, norms, (1.0, 2.0))]
        want = (a[0] * states[0][name] + a[1] * states[1][name]) / (a[0] + a[1])
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    manifest = json.loads((tmp_path / "out" / "deltawise_merge.json").read_text())
    assert [s["file"] for s in manifest["statistics"]] == [str(f) for f in fishers]


def test_fisher_merge_refuses_a_missing_or_mismatched_file(dd, tmp_path):
    recipe = {"merge_method": "fisher", "models": [
        {"model": str(dd["cls1"]), "parameters": {"fisher": str(tmp_path / "none.safetensors")}},
        {"model": str(dd["cls2"])}]}
    with pytest.raises(DeltawiseError, match="missing required parameter 'fisher'"):
        merge(recipe, tmp_path / "out")
    recipe["models"][1]["parameters"] = {"fisher": str(tmp_path / "none.safetensors")}
    with pytest.raises(DeltawiseError, match="none.safetensors does not exist"):
        merge(recipe, tmp_path / "out")
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"score.weight": torch.ones(2, 2)}, str(wrong))
    recipe["models"][1]["parameters"] = {"fisher": str(wrong)}
    recipe["models"][0]["parameters"] = {"fisher": str(wrong)}
    with pytest.raises(DeltawiseError, match=r"score.weight has shape \[2, 2\], the model's is \[3, 32\]"):
        merge(recipe, tmp_path / "out")
    gram = tmp_path / "g.safetensors"
    cli("gram", dd["cls1"], "--data", dd["labelled"], "-o", gram)
    recipe["models"] = [{"model": str(dd["cls1"]), "parameters": {"fisher": str(gram)}},
                        {"model": str(dd["cls2"]), "parameters": {"fisher": str(gram)}}]
    merge(recipe, tmp_path / "out2")  # a file without any Fisher: every tensor falls back to the average
    merged, a, b = load_state(tmp_path / "out2"), load_state(dd["cls1"]), load_state(dd["cls2"])
    for n in merged:
        torch.testing.assert_close(merged[n], (a[n] + b[n]) / 2)
    assert not (tmp_path / "out").exists()


def test_gram_matches_the_layer_inputs(dd, tmp_path):
    from deltawise.eval.models import load_model

    out = tmp_path / "g.safetensors"
    cli("gram", dd["lm1"], "--data", dd["text"], "-o", out, "--batch-size", 4)
    grams = load_file(out)
    lm = load_model(dd["lm1"])
    layer = lm.model.model.layers[0]
    xs = []
    with torch.no_grad():
        for text in TEXTS:  # one example at a time: no padding at all
            ids = torch.tensor([lm.tokenizer(text)["input_ids"] + [lm.tokenizer.eos_token_id]])
            xs.append(layer.input_layernorm(lm.model.model.embed_tokens(ids))[0])
    x = torch.cat(xs)
    torch.testing.assert_close(grams["model.layers.0.self_attn.q_proj.gram"], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    with safe_open(str(out), framework="pt") as fh:
        rows = json.loads(fh.metadata()["rows"])
    assert rows["model.layers.0.self_attn.q_proj.gram"] == x.shape[0]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in lm.model.modules())
    assert len(grams) == n_linear and grams["lm_head.gram"].shape == (32, 32)


def test_regmean_merge_end_to_end(dd, tmp_path):
    from deltawise.merge.methods.regmean import scaled_gram

    grams = []
    for name in ("lm1", "lm2"):
        grams.append(tmp_path / f"{name}.safetensors")
        cli("gram", dd[name], "--data", dd["text"], "-o", grams[-1])
    recipe = {"merge_method": "regmean", "parameters": {"alpha": 0.9}, "models": [
        {"model": str(dd["lm1"]), "parameters": {"gram": str(grams[0])}},
        {"model": str(dd["lm2"]), "parameters": {"gram": str(grams[1])}}]}
    merge(recipe, tmp_path / "out")
    merged, a, b = load_state(tmp_path / "out"), load_state(dd["lm1"]), load_state(dd["lm2"])
    ga, gb = load_file(grams[0]), load_file(grams[1])
    solved = 0
    for name, value in merged.items():
        key = name[: -len(".weight")] + ".gram"
        if key in ga:
            s = [scaled_gram(g[key].double(), 0.9) for g in (ga, gb)]
            want = torch.linalg.solve(s[0] + s[1], s[0] @ a[name].double().T + s[1] @ b[name].double().T).T
            torch.testing.assert_close(value.double(), want, rtol=1e-4, atol=1e-5)
            solved += 1
        else:
            torch.testing.assert_close(value, (a[name] + b[name]) / 2)
    assert solved == 2 * 7 + 1  # 7 linear layers per block, 2 blocks, and lm_head
