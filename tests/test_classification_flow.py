"""Classification end to end: ``train --task classification`` on string labels (a PEFT LoRA adapter, our own
SORSA delta) -> ``apply`` -> ``eval`` on the same JSONL -> ``merge``. The head is a tensor the base (a causal
LM) does not have; its labels are the ``label2id`` that train recorded."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from adapt_util import tiny_lm, train_cfg  # noqa: F401
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltawise.adapt import run_train
from deltawise.cli import app
from deltawise.io.reader import ModelReader

LABELS = {"neg": 0, "pos": 1}


@pytest.fixture(scope="module")
def classifiers(tiny_lm, tmp_path_factory):  # noqa: F811
    """Two PEFT LoRA classifiers (seeds 0, 1), a SORSA classifier and a SORSA language delta, all from one base."""
    root = tmp_path_factory.mktemp("cls_flow")
    lora = {"rank": 4, "targets": ["q_proj", "v_proj"]}
    for name, method, seed in (("lora_a", "lora", 0), ("lora_b", "lora", 1), ("sorsa", "sorsa", 0)):
        run_train(train_cfg(tiny_lm, root / name, method, lora, data=tiny_lm["cls"], task="classification",
                            max_steps=3, seed=seed))
    run_train(train_cfg(tiny_lm, root / "lm", "sorsa", lora, max_steps=2))
    return {**tiny_lm, "root": root}


def _cli(*args: str) -> str:
    r = CliRunner().invoke(app, [*args, "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


def _eval(model, data, out) -> dict:
    _cli("eval", str(model), "--target", str(data), "-o", str(out))
    return json.loads(out.read_text())["datasets"][0]


def _peft_head(folder) -> torch.Tensor:
    return load_file(folder / "adapter_model.safetensors")["base_model.model.score.weight"]


@torch.no_grad()
def _peft_predictions(base, adapter, texts: list[str]) -> list[int]:
    """PEFT's own reading of the adapter: the reference the applied model must match."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=tok.pad_token_id)
    model = PeftModel.from_pretrained(model, adapter).eval()
    return [int(model(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]


def test_peft_classifier_applies_with_its_new_head_and_labels(classifiers, tmp_path):
    """``apply`` failed with "the base has no tensor 'score.weight'" (the head PEFT saves as modules_to_save)."""
    adapter, out = classifiers["root"] / "lora_a", tmp_path / "applied"
    _cli("apply", str(adapter), "--base", str(classifiers["model"]), "-o", str(out))
    written = ModelReader(out)
    assert torch.equal(written.get("score.weight"), _peft_head(adapter))
    config = json.loads((out / "config.json").read_text())
    assert config["label2id"] == LABELS and config["id2label"] == {"0": "neg", "1": "pos"}
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert set(written.keys()) == set(ModelReader(classifiers["model"]).keys()) | {"score.weight"}


def test_peft_classifier_evaluates_on_string_labels_as_peft_predicts(classifiers, tmp_path):
    """``eval`` refused the JSONL's string labels ("label 'neg' is not one of the model's labels [LABEL_0, ...]");
    the applied model and the adapter folder itself both predict what PEFT's PeftModel predicts."""
    adapter, data = classifiers["root"] / "lora_a", classifiers["cls"]
    _cli("apply", str(adapter), "--base", str(classifiers["model"]), "-o", str(tmp_path / "applied"))
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    gold = [LABELS[json.loads(line)["label"]] for line in data.read_text().splitlines()]
    want = [int(p == g) for p, g in zip(_peft_predictions(classifiers["model"], adapter, texts), gold)]
    for model in (tmp_path / "applied", adapter):
        got = _eval(model, data, tmp_path / f"{model.name}.json")
        assert got["metric"] == "accuracy" and got["n_items"] == len(texts)
        assert [int(got["per_item"][str(i)]) for i in range(len(texts))] == want, model


def test_own_classifier_applies_and_evaluates_on_string_labels(classifiers, tmp_path):
    """A SORSA classifier's ``apply`` output carries the recorded labels, and eval reads the string labels with
    the predictions of the delta folder itself."""
    delta, data = classifiers["root"] / "sorsa", classifiers["cls"]
    _cli("apply", str(delta), "--base", str(classifiers["model"]), "-o", str(tmp_path / "applied"))
    assert json.loads((tmp_path / "applied" / "config.json").read_text())["label2id"] == LABELS
    applied = _eval(tmp_path / "applied", data, tmp_path / "a.json")
    assert applied["per_item"] == _eval(delta, data, tmp_path / "d.json")["per_item"]


def _merge(tmp_path, models: list, **parameters) -> ModelReader:
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models[0]),
              "models": [{"model": str(m)} for m in models[1:]], "parameters": parameters}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    _cli("merge", str(tmp_path / "r.yaml"), str(tmp_path / "merged"))
    return ModelReader(tmp_path / "merged")


def test_merging_two_classifier_adapters_averages_their_heads(classifiers, tmp_path):
    """The base has no head: the merged head is the mean of the two (a uniform soup), the body is task
    arithmetic, the labels go into the config, and eval reads the string labels."""
    root, base = classifiers["root"], classifiers["model"]
    merged = _merge(tmp_path, [base, root / "lora_a", root / "lora_b"], **{"lambda": 0.5})
    want = (_peft_head(root / "lora_a") + _peft_head(root / "lora_b")) / 2
    assert torch.allclose(merged.get("score.weight"), want, rtol=0, atol=1e-7)
    q = "model.layers.0.self_attn.q_proj.weight"
    applied = []
    for name in ("lora_a", "lora_b"):
        _cli("apply", str(root / name), "--base", str(base), "-o", str(tmp_path / name))
        applied.append(ModelReader(tmp_path / name).get(q))
    w0 = ModelReader(base).get(q)
    assert torch.allclose(merged.get(q), w0 + 0.5 * ((applied[0] - w0) + (applied[1] - w0)), atol=1e-6)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["label2id"] == LABELS
    assert _eval(tmp_path / "merged", classifiers["cls"], tmp_path / "m.json")["n_items"] == 8


def test_merging_a_classifier_with_a_language_delta_keeps_its_head(classifiers, tmp_path):
    """One input adds the head (our own SORSA classifier), the other (a language delta) has none: copied as trained."""
    root = classifiers["root"]
    merged = _merge(tmp_path, [classifiers["model"], root / "sorsa", root / "lm"], **{"lambda": 1.0})
    from deltawise.delta.store import DeltaFile

    assert torch.equal(merged.get("score.weight"), DeltaFile(root / "sorsa").get("score.weight").values)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


def test_heads_for_different_labels_are_not_merged(classifiers, tmp_path):
    root = classifiers["root"]
    other = tmp_path / "other"
    import shutil

    shutil.copytree(root / "lora_b", other)
    record = json.loads((other / "deltawise_train.json").read_text())
    record["label2id"] = {"no": 0, "yes": 1}
    (other / "deltawise_train.json").write_text(json.dumps(record))
    recipe = {"merge_method": "linear", "base_model": str(classifiers["model"]),
              "models": [{"model": str(root / "lora_a"), "parameters": {"weight": 1.0}},
                         {"model": str(other), "parameters": {"weight": 1.0}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(app, ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q"])
    assert r.exit_code != 0 and "different labels" in str(r.exception) + r.output
    assert not (tmp_path / "out").exists()


def test_string_labels_on_a_model_without_label_names_say_where_the_names_are(classifiers, tmp_path):
    r = CliRunner().invoke(app, ["eval", str(classifiers["model"]), "--target", str(classifiers["cls"]),
                                 "-o", str(tmp_path / "b.json"), "-q"])
    message = str(r.exception)
    assert r.exit_code == 1 and "'neg' is not one of the model's labels ['LABEL_0', 'LABEL_1']" in message
    assert "the folder train wrote" in message and not (tmp_path / "b.json").exists()
