"""Data formats, classification and multiple-choice accuracy, and the eval command end to end."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from deltawise.cli import app
from deltawise.data.read import load_items, split_documents
from deltawise.errors import InputError
from deltawise.eval.choice import multiple_choice
from deltawise.eval.classify import classify
from deltawise.eval.models import load_model
from deltawise.eval.results import load_result
from eval_util import save_tiny_classifier, save_tiny_lm
from conftest import perturb, tree_digest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltasks")
    base = save_tiny_lm(root / "base")
    return {"base": base, "ft": perturb(base, root / "ft", seed=5, scale=0.05), "cls": save_tiny_classifier(root / "cls")}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fortune_and_blank_line_documents(tmp_path):
    # with '%' lines present only they separate (a blank line stays inside a fortune); else blank lines do
    assert split_documents("%\nfirst\nline two\n%\nsecond\n%\n\nthird\n\n\nfourth\n") == ["first\nline two", "second",
                                                                                         "third\n\n\nfourth"]
    assert split_documents("third\n\n\nfourth\n") == ["third", "fourth"]
    f = tmp_path / "computers"  # fortune files have no suffix
    f.write_text("one\n%\ntwo\n%\n")
    assert [i.text for i in load_items(f)] == ["one", "two"]


def test_jsonl_and_datasets_folder(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0, "id": "x"}]
    items = load_items(write_jsonl(tmp_path / "d.jsonl", rows), require=("text", "label"))
    assert [i.id for i in items] == ["0", "x"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert [i.text for i in load_items(tmp_path / "ds")] == ["a", "b"]


def test_bad_data_errors(tmp_path):
    (tmp_path / "x.csv").write_text("text,label\n")
    with pytest.raises(InputError, match="unsupported dataset format"):
        load_items(tmp_path / "x.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="not a `datasets` folder"):
        load_items(tmp_path / "folder")
    with pytest.raises(InputError, match="lacks field"):
        load_items(write_jsonl(tmp_path / "m.jsonl", [{"txt": "a"}]))
    with pytest.raises(InputError, match="not found"):
        load_items(tmp_path / "nope.txt")


def test_classification_accuracy_matches_unbatched_argmax(models):
    lm = load_model(models["cls"], "classification")
    texts = ["short", "a somewhat longer text", "mid size one", "x", "another example here"]
    with torch.no_grad():
        preds = [int(lm.model(**lm.tokenizer(t, return_tensors="pt")).logits.argmax()) for t in texts]
    labels = [preds[0], (preds[1] + 1) % 3, preds[2], (preds[3] + 1) % 3, preds[4]]
    from deltawise.data.read import Item

    items = [Item(str(i), {"text": t, "label": y}) for i, (t, y) in enumerate(zip(texts, labels))]
    outcomes = classify(lm, items, max_length=64, batch_size=4)
    assert [o.predicted for o in outcomes] == preds
    assert [o.correct for o in outcomes] == [True, False, True, False, True]


def test_multiple_choice_scores_are_choice_log_likelihoods(models):
    lm = load_model(models["base"])
    from deltawise.data.read import Item

    item = Item("q", {"question": "Capital of France?", "choices": ["Paris", "Rome is far"], "answer": 0})
    out = multiple_choice(lm, [item], norm="total", max_length=64)[0]
    ctx = lm.tokenizer("Capital of France?")["input_ids"]
    for c, choice in enumerate(["Paris", "Rome is far"]):
        cont = lm.tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
        manual = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
        assert out.scores[c] == pytest.approx(manual, rel=1e-5)
    per_token = multiple_choice(lm, [item], norm="token", max_length=64)[0]
    assert per_token.scores[1] == pytest.approx(out.scores[1] / len(" Rome is far"), rel=1e-5)  # one token per character


def test_eval_cli_with_baseline(models, tmp_path):
    src = tmp_path / "en.txt"
    src.write_text("The quick brown fox.\n\nJumps over the lazy dog.\n%\nAnd runs away again.\n")
    tgt = write_jsonl(tmp_path / "quiz.jsonl",
                      [{"question": f"q{i}?", "choices": ["yes", "no", "maybe"], "answer": i % 3} for i in range(6)])
    before = tree_digest(models["ft"])
    runner = CliRunner()
    args = ["--source", str(src), "--target", str(tgt), "--max-length", "32", "-q"]
    r = runner.invoke(app, ["eval", str(models["base"]), *args, "-o", str(tmp_path / "base.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(models["ft"]), *args, "-o", str(tmp_path / "ft.json"),
                            "--baseline", str(tmp_path / "base.json")])
    assert r.exit_code == 0, r.output
    res = load_result(tmp_path / "ft.json")
    raw = json.loads((tmp_path / "ft.json").read_text())
    assert raw["schema"] == "deltawise.eval/1" and raw["kind"] == "eval"
    en, quiz = res.datasets
    assert en.metric == "perplexity" and en.n_tokens > 0 and en.tokens_per_s > 0
    assert quiz.task == "multiple_choice" and set(quiz.per_item) == {str(i) for i in range(6)}
    f = res.forgetting
    assert f is not None and f.forgetting_score is not None and f.forgetting_score >= 0
    assert f.datasets[0].ratio == pytest.approx(load_result(tmp_path / "base.json").datasets[0].value / en.value)
    assert tree_digest(models["ft"]) == before


def test_lm_eval_missing_is_a_clear_message(models, tmp_path, monkeypatch):
    from deltawise.eval import lm_eval_bridge

    monkeypatch.setattr(lm_eval_bridge, "lm_eval_available", lambda: False)  # as on a machine without lm-eval
    r = CliRunner().invoke(app, ["eval", str(models["base"]), "--tasks", "hellaswag", "-o", str(tmp_path / "r.json"), "-q"])
    assert r.exit_code != 0
    assert "pip install lm-eval" in str(r.exception)
