"""aTLAS: zero steps give the base, gradients reach Lambda (checked by finite differences), the
loss falls on a tiny task, and the written model is theta0 + sum Lambda tau with the logged coefficients."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from stats_util import dd  # noqa: F401
from typer.testing import CliRunner

from conftest import load_state
from deltawise.cli import app
from deltawise.data.tasks import batches, encode, load_data
from deltawise.search.atlas import AtlasOptions, Composer, learn, step_loss
from deltawise.eval.models import load_model


def _atlas(*args):
    result = CliRunner().invoke(app, ["atlas", *map(str, args), "--quiet"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output


def test_zero_steps_return_the_base(dd, tmp_path):
    out = tmp_path / "out"
    _atlas(dd["cls"], dd["cls1"], dd["cls2"], "--data", dd["labelled"], "--steps", 0, "-o", out)
    merged, base = load_state(out), load_state(dd["cls"])
    assert merged.keys() == base.keys() and all(torch.equal(merged[k], base[k]) for k in base)
    log = json.loads((out / "atlas.json").read_text())
    assert set(log["coefficients"]) == {str(dd["cls1"]), str(dd["cls2"])}
    assert all(v == 0.0 for row in log["coefficients"].values() for v in row.values())
    assert len(log["coefficients"][str(dd["cls1"])]) == len(base)  # one per tensor


def test_gradients_reach_lambda_and_match_finite_differences(dd):
    lm = load_model(dd["cls"], "classification")
    composer = Composer(lm, [str(dd["cls1"]), str(dd["cls2"])])
    data = load_data(dd["labelled"])
    batch = next(batches(lm, encode(lm, data, 64), "classification", 9))
    with torch.no_grad():
        composer.lam.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(0))
    loss = step_loss(lm.model, composer, [batch, batch], "classification", "ce")
    loss.backward()
    grad = composer.lam.grad
    assert grad is not None and (grad.abs().sum(1) > 0).all()  # every task's coefficients get a gradient
    t, b = divmod(int(grad.abs().argmax()), grad.shape[1])
    eps = 1e-2
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            composer.lam[t, b] += sign * eps
            values.append(float(step_loss(lm.model, composer, [batch, batch], "classification", "ce")))
            composer.lam[t, b] -= sign * eps
    assert (values[0] - values[1]) / (2 * eps) == pytest.approx(float(grad[t, b]), rel=0.05)


def _fine_tune(src, dst, data_path, steps=25):
    """A few full fine-tuning steps of the classifier on the data: a task vector that lowers the loss."""
    shutil.copytree(src, dst)
    lm = load_model(dst, "classification")
    model = lm.model.train()
    batch = next(batches(lm, encode(lm, load_data(data_path), 64), "classification", 64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(dst)
    return dst


def test_learning_lowers_the_loss_and_the_output_is_the_composition(dd, tmp_path):
    ft = _fine_tune(dd["cls"], tmp_path / "ft", dd["labelled"])
    opts = AtlasOptions(steps=12, lr=0.08, batch_size=9)
    result, composer, lm = learn(str(dd["cls"]), [str(ft)], [dd["labelled"]], opts, val=[dd["labelled"]])
    batch = next(batches(lm, encode(lm, load_data(dd["labelled"]), 64), "classification", 9))
    with torch.no_grad():
        composer.lam.zero_()
        start = float(step_loss(lm.model, composer, [batch], "classification", "ce"))
        composer.lam.copy_(torch.tensor(result.coefficients))
        end = float(step_loss(lm.model, composer, [batch], "classification", "ce"))
    assert end < start - 0.05
    assert len(result.history) == 12 and result.history[-1]["validation"] >= result.history[0]["validation"]

    out = tmp_path / "out"
    _atlas(dd["cls"], ft, "--data", dd["labelled"], "--val", dd["labelled"], "--steps", 12, "--lr", 0.08, "--batch-size", 9,
           "-o", out)
    log = json.loads((out / "atlas.json").read_text())
    coeffs = log["coefficients"][str(ft)]
    merged, base, tuned = load_state(out), load_state(dd["cls"]), load_state(ft)
    assert any(abs(v) > 0.01 for v in coeffs.values())
    for name, value in merged.items():
        torch.testing.assert_close(value, base[name] + coeffs[name] * (tuned[name] - base[name]), rtol=1e-5, atol=1e-6)


def test_lm_and_entropy_objectives_run(dd, tmp_path):
    opts = AtlasOptions(steps=2, batch_size=4)
    result, _, _ = learn(str(dd["lm"]), [str(dd["lm1"]), str(dd["lm2"])], [dd["text"]], opts)
    assert result.objective == "lm" and len(result.coefficients) == 2
    assert any(v != 0 for row in result.coefficients for v in row)
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["good", "bad day", "fine"]))
    result, _, _ = learn(str(dd["cls"]), [str(dd["cls1"])], [unlabelled], AtlasOptions(steps=1, task="classification"))
    assert result.objective == "entropy" and any(v != 0 for v in result.coefficients[0])


def test_test_data_reports_the_chosen_coefficients_out_of_sample(dd, tmp_path):
    from deltawise.eval.runner import EvalOptions, evaluate

    test = tmp_path / "test.txt"
    test.write_text("\n\n".join(["good food day", "sad play song", "nice warm sun", "awful day", "fine song play"]) + "\n")
    out = tmp_path / "out"
    _atlas(dd["lm"], dd["lm1"], dd["lm2"], "--data", dd["text"], "--test", test, "--steps", 2, "--batch-size", 4, "-o", out)
    report = json.loads((out / "atlas.json").read_text())["test"]
    task = report["tasks"]["test"]
    # the same numbers as `deltawise eval` of the written model and of the base on the test file
    opts = EvalOptions(max_length=64)
    merged = evaluate(str(out), [], [test], opts).datasets[0].value
    base = evaluate(str(dd["lm"]), [], [test], opts).datasets[0].value
    assert task["atlas"] == pytest.approx(merged, rel=1e-4) and task["base"] == pytest.approx(base, rel=1e-6)
    assert task["ratio"] == pytest.approx(base / merged, rel=1e-4) and task["items"] == 5
    assert task["ratio_ci"][0] <= task["ratio"] <= task["ratio_ci"][1]


def test_test_data_that_is_also_training_data_is_refused(dd, tmp_path):
    result = CliRunner().invoke(app, ["atlas", str(dd["lm"]), str(dd["lm1"]), "--data", str(dd["text"]), "--test",
                                      str(dd["text"]), "--steps", "1", "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code != 0 and "not be out of sample" in str(result.exception)
    assert not (tmp_path / "out").exists()
