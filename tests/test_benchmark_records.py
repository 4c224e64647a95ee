"""benchmarks/records.py and task_merging.run_seed's use of it: a seed's finished rows kept in a record in the
repository, so a benchmark spans machines that keep no work folder.

Checked with the seed's expensive steps replaced by fakes that count their calls: every finished row is written to
the record; a fresh work folder with a complete record trains no expert and gives the recorded rows; a partial record
is resumed (only the missing row is computed) once the retrained experts score as the record's; experts that score
otherwise are refused, naming both; a record made with other settings is neither used nor overwritten; --quick
never records. The same for compression_accuracy.py (per seed) and continual_finetuning.py (per finished run,
reused only with the same definition)."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compression_accuracy  # noqa: E402
import continual_finetuning  # noqa: E402
import minilm_tasks  # noqa: E402
import records  # noqa: E402
import task_merging  # noqa: E402
from minilm_tasks import Experts  # noqa: E402


class FakeScorer:
    accuracy_value = 0.75

    def __init__(self, *args):
        pass

    def accuracy(self, body, task, split) -> float:
        return self.accuracy_value

    def correct(self, body, task, split) -> list[int]:
        return [1, 1, 0] if self.accuracy_value == 0.75 else [1, 0, 0]

    def scores(self, body, split) -> dict:
        return {"a": 0.5, "b": 0.25}


@pytest.fixture
def seed_run(tmp_path, monkeypatch):
    calls = {"experts": 0, "methods": []}

    def experts_for(minilm, work, tasks, epochs, lr, seed, say=print):
        calls["experts"] += 1
        return Experts(work / "base", {t: work / t for t in tasks}, {}, {}, {})

    def run_method(label, *args, **kwargs):
        calls["methods"].append(label)
        return {"method": label, "params": {"lambda": 0.4}, "test": {"a": 0.5, "b": 0.5},
                "test_items": {"a": [1, 0], "b": [0, 1]}}

    splits = {"train": [{}], "validation": [{}], "test": [{}]}
    monkeypatch.setattr(minilm_tasks, "prepare_tasks", lambda *a, **k: {"a": splits, "b": splits})
    monkeypatch.setattr(minilm_tasks, "experts_for", experts_for)
    monkeypatch.setattr(minilm_tasks, "Scorer", FakeScorer)
    monkeypatch.setattr(minilm_tasks, "load_body", lambda path: {})
    monkeypatch.setattr(task_merging, "load_body", lambda path: {})
    monkeypatch.setattr(task_merging, "run_method", run_method)
    monkeypatch.setattr(records, "RECORDS", tmp_path)

    def run(work: str, methods: list[str], quick: bool = False, epochs: float = 3.0) -> dict:
        args = Namespace(work=tmp_path / work, quick=quick, epochs=epochs, lr=1e-4, no_record=quick, no_sequential=True,
                         executor="inline", jobs=None)
        monkeypatch.setattr(task_merging, "executor_options", lambda a: None)
        return task_merging.run_seed(5, args, methods, tmp_path / "minilm")

    return run, calls, records.record_path("task_merging", 5, tmp_path)


def test_rows_are_recorded_and_a_complete_record_needs_no_experts(seed_run):
    run, calls, record = seed_run
    first = run("machine-1", ["task_arithmetic", "ties"])
    assert calls == {"experts": 1, "methods": ["task_arithmetic", "ties"]}
    saved = json.loads(record.read_text())
    assert set(saved["merges"]) == {"task_arithmetic", "ties"}
    assert saved["merges"]["ties"]["test_items"] == {"a": [1, 0], "b": [0, 1]}
    again = run("machine-2", ["task_arithmetic", "ties"])  # a new machine: empty work folder
    assert calls["experts"] == 1 and calls["methods"] == ["task_arithmetic", "ties"]
    assert again["merges"] == first["merges"]


def test_a_partial_record_resumes_only_with_the_same_experts(seed_run, monkeypatch):
    run, calls, record = seed_run
    run("machine-1", ["task_arithmetic"])
    run("machine-2", ["task_arithmetic", "ties"])
    assert calls == {"experts": 2, "methods": ["task_arithmetic", "ties"]}  # retrained experts matched: one new row
    assert set(json.loads(record.read_text())["merges"]) == {"task_arithmetic", "ties"}
    monkeypatch.setattr(FakeScorer, "accuracy_value", 0.7)
    with pytest.raises(SystemExit, match="differ from those its cached or recorded rows") as raised:
        run("machine-3", ["task_arithmetic", "ties", "tsv"])
    assert "0.7" in str(raised.value) and "0.75" in str(raised.value)
    assert "tsv" not in calls["methods"] and "tsv" not in json.loads(record.read_text())["merges"]


def test_a_record_with_other_settings_is_neither_used_nor_overwritten(seed_run):
    run, calls, record = seed_run
    run("machine-1", ["task_arithmetic"])
    before = record.read_text()
    run("machine-2", ["task_arithmetic"], epochs=1.0)
    assert calls["methods"] == ["task_arithmetic", "task_arithmetic"] and record.read_text() == before
    with pytest.raises(SystemExit, match="computed with other settings"):
        run("machine-2", ["task_arithmetic"])  # the same work folder, back to the record's settings


def test_a_finished_work_folder_writes_its_missing_record(seed_run):
    run, calls, record = seed_run
    run("machine-1", ["task_arithmetic"])
    record.unlink()
    run("machine-1", ["task_arithmetic"])  # everything cached in the work folder: nothing computed, record written
    assert calls == {"experts": 1, "methods": ["task_arithmetic"]}
    assert "task_arithmetic" in json.loads(record.read_text())["merges"]


def test_quick_runs_never_record(seed_run):
    run, calls, record = seed_run
    run("quick", ["task_arithmetic"], quick=True)
    assert calls["methods"] == ["task_arithmetic"] and not record.exists()


def test_load_record_says_why_it_skips(tmp_path):
    path = records.record_path("bench", 1, tmp_path)
    assert records.load_record(path, {"x": 1}) is None
    records.save_record(path, {"settings": {"x": 1}, "rows": [1, 2]})
    assert records.load_record(path, {"x": 1}) == {"settings": {"x": 1}, "rows": [1, 2]}
    said = []
    assert records.load_record(path, {"x": 2}, say=said.append) is None
    assert said and "other settings (x 1, here 2)" in said[0]
    assert records.differences({"x": 1, "y": [1]}, {"x": 1, "z": 2}, {"z": "why z matters"}) == (
        "y [1], here None; z None, here 2 (why z matters)")


def test_compression_resumes_from_its_record_and_checks_the_experts(tmp_path, monkeypatch):
    trained = []
    splits = {"train": [{}], "validation": [{}], "test": [{}]}
    monkeypatch.setattr(minilm_tasks, "prepare_tasks", lambda *a, **k: {"a": splits})
    monkeypatch.setattr(minilm_tasks, "experts_for", lambda minilm, work, tasks, *a, **k: trained.append(work)
                        or Experts(work / "base", {"a": work / "a"}, {}, {}, {}))
    monkeypatch.setattr(minilm_tasks, "Scorer", FakeScorer)
    monkeypatch.setattr(minilm_tasks, "load_body", lambda path: {})
    monkeypatch.setattr(compression_accuracy, "load_body", lambda path: {})
    monkeypatch.setattr(compression_accuracy, "compressions", lambda *a: [])
    monkeypatch.setattr(records, "RECORDS", tmp_path)

    def run(work: str) -> dict:
        args = Namespace(work=tmp_path / work, experts=tmp_path / "experts", quick=False, epochs=3.0, lr=1e-4, no_record=False)
        return compression_accuracy.run_seed(4, args, tmp_path / "minilm")

    first = run("machine-1")
    assert len(trained) == 1 and first["complete"] == compression_accuracy.SEARCH_VERSION and first["experts"] == {"a": 0.75}
    assert run("machine-2") == first and len(trained) == 1  # complete record: no experts trained
    record = records.record_path("compression_accuracy", 4, tmp_path)
    partial = {k: v for k, v in json.loads(record.read_text()).items() if k != "complete"}
    records.save_record(record, partial)
    assert run("machine-1") == first and len(trained) == 1  # the finished work folder brings its record up to date
    assert json.loads(record.read_text())["complete"] == compression_accuracy.SEARCH_VERSION
    records.save_record(record, partial)
    monkeypatch.setattr(FakeScorer, "accuracy_value", 0.5)
    with pytest.raises(SystemExit, match="differ from those its cached or recorded rows"):
        run("machine-3")


def test_continual_records_whole_runs_and_reuses_them_by_definition(tmp_path, monkeypatch):
    trained, computed = [], []
    splits = {"train": [{}], "validation": [{}], "test": [{}]}
    monkeypatch.setattr(continual_finetuning, "prepare_tasks", lambda *a, **k: {"a": splits, "b": splits, "c": splits})
    monkeypatch.setattr(continual_finetuning, "experts_for", lambda minilm, work, tasks, *a, **k: trained.append(work)
                        or Experts(work / "base", {t: work / t for t in tasks}, {}, {}, {}))
    monkeypatch.setattr(continual_finetuning.Context, "scorer", lambda self, heads: FakeScorer())
    monkeypatch.setattr(continual_finetuning, "load_body", lambda path: {})

    def fake_run(ctx, label, *args):
        computed.append(label)
        return {"order": ctx.order, "steps": [{"task": t, "test_items": {t: [1]}} for t in ctx.order]}

    monkeypatch.setattr(continual_finetuning, "sequential_training", fake_run)
    monkeypatch.setattr(continual_finetuning, "merged_steps", fake_run)
    monkeypatch.setattr(records, "RECORDS", tmp_path)

    def run(work: str, labels: list[str]) -> dict:
        args = Namespace(work=tmp_path / work, experts=tmp_path / work / "experts", quick=False, epochs=3.0, lr=1e-4,
                         no_record=False)
        return continual_finetuning.run_seed(2, args, labels, tmp_path / "minilm")

    first = run("machine-1", ["full", "opcm"])
    assert computed == ["full", "opcm"] and len(trained) == 1
    again = run("machine-2", ["full", "opcm"])
    assert computed == ["full", "opcm"] and len(trained) == 1  # every run recorded: no experts, nothing computed
    assert again["runs"]["full"]["steps"] == first["runs"]["full"]["steps"] and again["order"] == first["order"]
    run("machine-3", ["full", "lora"])
    assert computed == ["full", "opcm", "lora"] and len(trained) == 2  # only the missing run
    monkeypatch.setitem(continual_finetuning.RUNS, "full", continual_finetuning.Run("full", 3e-4))
    run("machine-4", ["full"])
    assert computed[-1] == "full"  # another definition: recomputed
    monkeypatch.setattr(FakeScorer, "accuracy_value", 0.5)  # experts that score otherwise
    with pytest.raises(SystemExit, match="differ from those its cached or recorded rows"):
        run("machine-5", ["hft"])
    assert "hft" not in computed


def test_report_without_sequential_merging_has_no_empty_figure(tmp_path, capsys):
    """A ``--no-sequential`` run (rows from a record, say) prints no empty sequential table and draws no empty figure."""
    run = {"experts": {"a": 1.0, "b": 0.5}, "heads_only": {"a": 0.5, "b": 0.25},
           "merges": {"task_arithmetic": {"params": {"lambda": 0.4}, "test": {"a": 0.5, "b": 0.5},
                                          "test_items": {"a": [1, 0], "b": [0, 1]}},
                      "ties": {"params": {"lambda": 0.5}, "test": {"a": 1.0, "b": 0.5},
                               "test_items": {"a": [1, 1], "b": [0, 1]}}}}
    summary = task_merging.summarize({2: run}, ["task_arithmetic", "ties"])
    task_merging.print_tables(summary, {2: run})
    assert "Sequential merging" not in capsys.readouterr().out
    payload = {"date": "d", "host": "h", "grid": task_merging.GRID, "seeds": {"2": run}, "summary": summary}
    task_merging.write_report(tmp_path / "r.html", payload)
    html = (tmp_path / "r.html").read_text()
    assert "fig-methods" in html and "fig-sequential" not in html
    run["sequential"] = {"curves": {"OPCM": [{"tasks": 1, "average": 0.5}, {"tasks": 2, "average": 0.6}]}}
    task_merging.write_report(tmp_path / "r.html", payload)
    assert "fig-sequential" in (tmp_path / "r.html").read_text()


def test_summary_gives_the_difference_in_points_over_seeds():
    def run(ta: float, ties: float) -> dict:
        return {"experts": {"a": 1.0, "b": 0.5}, "heads_only": {"a": 0.5, "b": 0.25},
                "merges": {"task_arithmetic": {"test": {"a": ta, "b": ta}}, "ties": {"test": {"a": ties, "b": ties}}}}

    summary = task_merging.summarize({0: run(0.5, 0.6), 1: run(0.4, 0.6), 2: run(0.5, 0.5)}, ["task_arithmetic", "ties"])
    points = summary["methods"]["ties"]["vs_task_arithmetic_points"]
    assert points["n"] == 3 and points["mean"] == pytest.approx(0.1)  # (0.1 + 0.2 + 0.0) / 3
    assert points["low"] < 0 < points["high"]  # sd 0.1 over 3 seeds: the t-interval holds 0
