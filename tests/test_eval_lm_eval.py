"""The lm-eval bridge end to end on a local multiple-choice task (runs whenever lm-eval is installed)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deltawise.cli import app
from deltawise.eval.results import load_result
from eval_util import save_tiny_lm

ITEMS = [
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo"], "answer": 0},
    {"question": "2 + 2 =", "choices": ["3", "4", "22"], "answer": 1},
    {"question": "Colour of the sky?", "choices": ["green", "red", "blue"], "answer": 2},
    {"question": "Opposite of hot?", "choices": ["cold", "warm"], "answer": 0},
    {"question": "Cats say", "choices": ["woof", "meow", "moo"], "answer": 1},
]

TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder, data):
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data))))
    return tasks


def test_local_lm_eval_task_matches_our_multiple_choice_scorer(tmp_path):
    # the tiny Llama of conftest.py with the character tokenizer the other eval tests use
    model = save_tiny_lm(tmp_path / "model")
    data = tmp_path / "tiny_mc.jsonl"
    tasks = write_task(tmp_path, data)
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(model), "--tasks", "target:tiny_mc", "--lm-eval-tasks-dir", str(tasks),
                            "-o", str(tmp_path / "lm.json"), "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    r = runner.invoke(app, ["eval", str(model), "--target", str(data), "--mc-norm", "total", "-o", str(tmp_path / "ours.json"),
                            "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    (lm,) = load_result(tmp_path / "lm.json").datasets
    (ours,) = load_result(tmp_path / "ours.json").datasets
    assert (lm.name, lm.role, lm.task, lm.metric, lm.n_items) == ("tiny_mc", "target", "lm_eval", "acc", len(ITEMS))
    assert 0.0 <= lm.value <= 1.0
    # both add one space between question and choice, keep the BOS token, and rank by total log-likelihood
    assert lm.value == pytest.approx(ours.value)
    assert lm.per_item == ours.per_item and set(lm.per_item) == {str(i) for i in range(len(ITEMS))}


def test_lm_eval_log_likelihoods_equal_our_choice_scores(tmp_path):
    """Stronger than equal accuracy: every choice's log-likelihood agrees (same tokens are scored)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from deltawise.data.read import load_items
    from deltawise.eval.choice import multiple_choice
    from deltawise.eval.models import load_model

    lm = load_model(save_tiny_lm(tmp_path / "model"))
    data = tmp_path / "tiny_mc.jsonl"
    tasks = write_task(tmp_path, data)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, backend="causal", batch_size=4),
                                  tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    theirs = {str(s["doc_id"]): [float(r[0][0]) for r in s["resps"]] for s in out["samples"]["tiny_mc"]}
    ours = {o.id: o.scores
            for o in multiple_choice(lm, load_items(data, require=("choices", "answer")), norm="total", max_length=64)}
    assert set(theirs) == set(ours)
    for k in ours:
        assert theirs[k] == pytest.approx(ours[k], abs=1e-4)


def test_unknown_lm_eval_task_names_the_folder(tmp_path):
    model = save_tiny_lm(tmp_path / "model")
    tasks = write_task(tmp_path, tmp_path / "tiny_mc.jsonl")
    r = CliRunner().invoke(app, ["eval", str(model), "--tasks", "no_such_task", "--lm-eval-tasks-dir", str(tasks),
                                 "-o", str(tmp_path / "r.json"), "-q"])
    assert r.exit_code != 0
    assert "no_such_task" in str(r.exception) and str(tasks) in str(r.exception)


def test_lm_eval_outside_a_git_checkout_prints_no_git_error(tmp_path, monkeypatch, capfd):
    """lm-eval logs ``git describe`` of the working folder; outside a checkout git's "fatal:" must not reach the user."""
    model = save_tiny_lm(tmp_path / "model")
    tasks = write_task(tmp_path, tmp_path / "tiny_mc.jsonl")
    outside = tmp_path / "not_a_checkout"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find a repository above tmp_path
    r = CliRunner().invoke(app, ["eval", str(model), "--tasks", "target:tiny_mc", "--lm-eval-tasks-dir", str(tasks),
                                 "-o", str(tmp_path / "lm.json"), "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    captured = capfd.readouterr()
    assert "not a git repository" not in captured.err + captured.out + r.output
    import lm_eval.evaluator

    from deltawise.eval.lm_eval_bridge import git_hash_without_stderr

    assert lm_eval.evaluator.get_git_commit_hash is not git_hash_without_stderr  # lm-eval's own name is restored
    assert git_hash_without_stderr() is None
