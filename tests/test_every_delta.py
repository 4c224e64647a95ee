"""Every command that runs a network takes a delta folder or a PEFT adapter as it takes a model: it loads as the
base plus the delta (the base the delta records, or ``--base``), with the numbers of the model ``apply`` writes."""

from __future__ import annotations

import json

import pytest
from adapt_util import tiny_lm, train_cfg  # noqa: F401
from typer.testing import CliRunner

from deltawise.adapt import run_train
from deltawise.cli import app
from deltawise.delta.apply import apply_delta
from deltawise.eval.models import load_model, model_fingerprint


@pytest.fixture(scope="module")
def sorsa_delta(tiny_lm, tmp_path_factory):  # noqa: F811
    """Our own ``train --method sorsa`` output: a delta folder recording its base, and that delta applied."""
    root = tmp_path_factory.mktemp("sorsa")
    run_train(train_cfg(tiny_lm, root / "delta", "sorsa", {"rank": 4, "targets": ["q_proj", "v_proj"]}, max_steps=3))
    apply_delta(str(root / "delta"), str(tiny_lm["model"]), root / "applied")
    return {"delta": root / "delta", "applied": root / "applied", **tiny_lm}


def _eval(model: str, data, out, *extra: str) -> dict:
    r = CliRunner().invoke(app, ["eval", model, "--target", str(data), "-o", str(out), "-q", *extra])
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(out.read_text())


def test_eval_takes_our_own_trained_delta_folder(sorsa_delta, tmp_path):
    """Failed with transformers' "Should have a `model_type` key" before the delta was loaded on its base."""
    on_delta = _eval(str(sorsa_delta["delta"]), sorsa_delta["data"], tmp_path / "d.json")
    on_applied = _eval(str(sorsa_delta["applied"]), sorsa_delta["data"], tmp_path / "a.json")
    (got,), (want,) = on_delta["datasets"], on_applied["datasets"]
    assert got["value"] == pytest.approx(want["value"], rel=1e-5)
    assert got["per_item_nll"] == pytest.approx(want["per_item_nll"], rel=1e-5)
    base = _eval(str(sorsa_delta["model"]), sorsa_delta["data"], tmp_path / "b.json")["datasets"][0]
    assert got["value"] != pytest.approx(base["value"], rel=1e-6)  # the delta was applied, not only the base loaded
    assert on_delta["fingerprint"] == model_fingerprint(sorsa_delta["delta"]) != on_applied["fingerprint"]


def test_loaded_delta_has_the_applied_models_weights(sorsa_delta):
    on_delta, applied = load_model(sorsa_delta["delta"]), load_model(sorsa_delta["applied"])
    want = applied.model.state_dict()
    for name, value in on_delta.model.state_dict().items():
        assert value.equal(want[name]), name
    assert on_delta.path == sorsa_delta["delta"] and on_delta.warnings == []


def test_peft_adapter_evaluates_on_its_recorded_base_or_on_base(sorsa_delta, tmp_path):
    """An adapter ``extract --lora`` wrote (PEFT format) evaluates directly; ``--base`` names the base explicitly."""
    model, applied, data = sorsa_delta["model"], sorsa_delta["applied"], sorsa_delta["data"]
    r = CliRunner().invoke(app, ["extract", str(applied), "--base", str(model), "-o", str(tmp_path / "ad"), "--lora",
                                 "--rank", "4", "-q"])
    assert r.exit_code == 0, r.output
    apply_delta(str(tmp_path / "ad"), str(model), tmp_path / "ad_applied")
    want = _eval(str(tmp_path / "ad_applied"), data, tmp_path / "w.json")["datasets"][0]["value"]
    assert _eval(str(tmp_path / "ad"), data, tmp_path / "g.json")["datasets"][0]["value"] == pytest.approx(want, rel=1e-5)
    given = _eval(str(tmp_path / "ad"), data, tmp_path / "b.json", "--base", str(model))["datasets"][0]["value"]
    assert given == pytest.approx(want, rel=1e-5)


def test_eval_base_option_overrides_the_recorded_base(sorsa_delta, tmp_path):
    """``--base`` adds the delta to another model of the same shapes: here the applied model, so the delta counts twice."""
    delta, applied, data = sorsa_delta["delta"], sorsa_delta["applied"], sorsa_delta["data"]
    apply_delta(str(delta), str(sorsa_delta["model"]), tmp_path / "twice", scale=2.0)
    want = _eval(str(tmp_path / "twice"), data, tmp_path / "w.json")["datasets"][0]["value"]
    result = _eval(str(delta), data, tmp_path / "g.json", "--base", str(applied))
    assert result["datasets"][0]["value"] == pytest.approx(want, rel=1e-4)
    assert any("transfer to a new base" in w for w in result["settings"]["warnings"]), result["settings"]


def test_interpolate_between_a_base_and_a_delta(sorsa_delta, tmp_path):
    """B given as a delta folder: the curve ends at the applied model's loss, as with the applied folder itself."""
    curves = []
    for name, b in (("delta", sorsa_delta["delta"]), ("applied", sorsa_delta["applied"])):
        out = tmp_path / f"{name}.json"
        r = CliRunner().invoke(app, ["analyze", "interpolate", str(sorsa_delta["model"]), str(b), "--data",
                                     str(sorsa_delta["data"]), "--points", "3", "-o", str(out), "-q"])
        assert r.exit_code == 0, (r.output, r.exception)
        curves.append(json.loads(out.read_text()))
    assert curves[0]["loss"] == pytest.approx(curves[1]["loss"], rel=1e-5)
    assert curves[0]["loss"][0] != pytest.approx(curves[0]["loss"][-1], rel=1e-6)


def test_classification_delta_evaluates_with_its_string_labels(tiny_lm, tmp_path):  # noqa: F811
    """A sorsa classifier trained on string labels: eval on the same JSONL maps them through the saved label2id
    and scores as the model that ``train``'s own materialization writes."""
    from deltawise.adapt.materialize import materialize

    delta = tmp_path / "cls_delta"
    run_train(train_cfg(tiny_lm, delta, "sorsa", {"rank": 4, "targets": ["q_proj", "v_proj"]}, data=tiny_lm["cls"],
                        task="classification", max_steps=3))
    full = materialize(delta, tiny_lm["model"], tmp_path / "cls_full")
    got = _eval(str(delta), tiny_lm["cls"], tmp_path / "d.json")["datasets"][0]
    want = _eval(str(full), tiny_lm["cls"], tmp_path / "f.json")["datasets"][0]
    assert got["metric"] == "accuracy" and got["n_items"] == want["n_items"]
    assert got["per_item"] == want["per_item"]
    loaded = load_model(delta, "classification")
    recorded = json.loads((delta / "deltawise_train.json").read_text())["label2id"]
    assert set(recorded) == {"neg", "pos"} and loaded.model.config.label2id == recorded
    assert loaded.model.config.num_labels == 2


def _weights(tmp_path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    r = CliRunner().invoke(app, ["analyze", "weights", *args, "-o", str(out), "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(out.read_text())


def test_analyze_weights_takes_a_delta_folder_as_the_applied_model(sorsa_delta, tmp_path):
    """It used to report every tensor the delta does not store as missing (25 on SmolLM2), then to refuse it.
    Read as base + delta, every per-tensor delta norm and intruder count is the applied model's."""
    base, delta, applied = (str(sorsa_delta[k]) for k in ("model", "delta", "applied"))
    on_delta = _weights(tmp_path, "d", base, delta, applied)
    want = _weights(tmp_path, "a", base, applied, applied)
    assert [t["name"] for t in on_delta["tensors"]] == [t["name"] for t in want["tensors"]]
    changed = 0
    for got, ref in zip(on_delta["tensors"], want["tensors"]):
        (d, a1), (r, r1) = got["deltas"], ref["deltas"]
        assert d["norm"] == pytest.approx(r["norm"], rel=1e-5, abs=1e-7), got["name"]
        assert a1["norm"] == pytest.approx(r1["norm"], rel=1e-5, abs=1e-7)
        assert [i["count"] for i in got.get("intruders") or []] == [i["count"] for i in ref.get("intruders") or []]
        changed += d["norm"] > 0
    assert changed == 4  # q_proj and v_proj of two layers: what sorsa trained, and nothing else
    # the delta against itself (applied): no conflicts, as between two copies of one fine-tune
    assert on_delta["summary"]["sign_conflict_rate"] == 0
    assert on_delta["models"][0]["fingerprint"] == model_fingerprint(sorsa_delta["delta"])
    assert on_delta["settings"]["warnings"] == []


def test_analyze_weights_base_option_and_foreign_base_warning(sorsa_delta, tmp_path):
    """``--base`` adds the delta to another model: on the applied model the delta counts twice, and
    against BASE that is reported, since its delta then holds the two bases' difference."""
    base, delta, applied = (str(sorsa_delta[k]) for k in ("model", "delta", "applied"))
    apply_delta(delta, base, tmp_path / "twice", scale=2.0)
    got = _weights(tmp_path, "g", base, delta, "--base", applied)
    want = _weights(tmp_path, "w", base, str(tmp_path / "twice"))
    for g, w in zip(got["tensors"], want["tensors"]):
        assert g["deltas"][0]["norm"] == pytest.approx(w["deltas"][0]["norm"], rel=1e-4, abs=1e-7), g["name"]
    assert any("differ from the analysed base" in w for w in got["settings"]["warnings"])


def test_fisher_and_soup_take_a_delta_folder(sorsa_delta, tmp_path):
    """Both read the model's tensors by name beside running it; they opened a delta folder as a checkpoint
    ("no safetensors"). Now the statistics of the delta are the applied model's, and a soup takes it as an ingredient."""
    from safetensors.torch import load_file

    stats = {}
    for name in ("delta", "applied"):
        out = tmp_path / f"{name}.safetensors"
        r = CliRunner().invoke(app, ["fisher", str(sorsa_delta[name]), "--data", str(sorsa_delta["data"]), "-o", str(out),
                                     "-q", "--max-examples", "3"])
        assert r.exit_code == 0, (r.output, r.exception)
        stats[name] = load_file(out)
    assert stats["delta"].keys() == stats["applied"].keys() and stats["delta"]
    for key, value in stats["delta"].items():
        assert value.allclose(stats["applied"][key], rtol=1e-4, atol=1e-12), key
    r = CliRunner().invoke(app, ["soup", str(sorsa_delta["delta"]), str(sorsa_delta["model"]), "--data",
                                 str(sorsa_delta["data"]), "-o", str(tmp_path / "soup"), "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert (tmp_path / "soup" / "soup.json").is_file()


def test_report_takes_a_train_output_folder(sorsa_delta, tmp_path):
    """A delta folder given to report adds its training run (from train's record and log); before, every JSON in
    it was skipped and a report of the folder alone failed with "no deltawise results"."""
    import re

    delta = sorsa_delta["delta"]
    r = CliRunner().invoke(app, ["report", str(delta), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "skipped" not in r.output
    html = (tmp_path / "r.html").read_text()
    row = re.search(r'<table id="table-training">.*?<tbody><tr>(.*?)</tr>', html).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    log = json.loads((delta / "training_log.json").read_text())
    record = json.loads((delta / "deltawise_train.json").read_text())
    assert cells[:3] == ["delta", "sorsa", "delta"] and cells[5] == str(record["steps"]) == "3"
    assert cells[6].startswith(f"{record['trainable_params']:,} (")
    assert cells[8] == f"{log[0]['loss']:.4g}" and cells[9] == f"{log[-1]['loss']:.4g}"
