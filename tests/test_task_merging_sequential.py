"""benchmarks/task_merging.py's sequential merging: resumed method by method (a run stopped part-way keeps the
methods it finished, and the rerun computes only the rest), per-item final scores kept for the paired intervals,
and the OPCM-against-baselines comparison paired by seed and task order, checked against hand-computed values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import task_merging  # noqa: E402
from minilm_tasks import seed_summary  # noqa: E402

TASKS = ["a", "b"]


class OrderScorer:
    """Scores a "body" (the dict load_body returns): every item right when its task was merged last."""

    tasks = TASKS

    def correct(self, body, task, split) -> list[int]:
        return [1, 1, 0, 0] if body["last"] == task else [1, 0, 0, 0]

    def scores(self, body, split, tasks=None) -> dict:
        return {t: sum(self.correct(body, t, split)) / 4 for t in tasks or self.tasks}


@pytest.fixture
def fake_steps(monkeypatch):
    calls: list[str] = []
    fail_on: dict[str, str] = {}

    def continual_steps(method, params, order, ex, folder):
        def step(t: int) -> Path:
            if fail_on.get("method") == method:
                raise RuntimeError("stopped")
            calls.append(method)
            return folder / order[t - 1]

        return step

    monkeypatch.setattr(task_merging, "continual_steps", continual_steps)
    monkeypatch.setattr(task_merging, "load_body", lambda path: {"last": path.name})
    return calls, fail_on


def test_a_stopped_run_keeps_finished_methods_and_the_rerun_does_only_the_rest(tmp_path, fake_steps):
    calls, fail_on = fake_steps
    orders = task_merging.task_orders(TASKS, seed=3, count=2)
    assert orders == task_merging.task_orders(TASKS, seed=3, count=2)  # the same orders on every machine
    out, saves = {}, []
    fail_on["method"] = "continual_ties"
    with pytest.raises(RuntimeError):
        task_merging.sequential(orders, None, tmp_path, OrderScorer(), out, lambda: saves.append(dict(out["final"])))
    finished = list(out["final"])
    assert finished == ["task arithmetic (λ=0.3)", "running average"] and len(saves) == 2
    for label in finished:
        assert len(out["final_items"][label]) == 2
        items = out["final_items"][label][0]
        assert out["final"][label][0] == pytest.approx(sum(sum(v) / 4 for v in items.values()) / 2)
    calls.clear()
    fail_on.clear()
    task_merging.sequential(orders, None, tmp_path, OrderScorer(), out, lambda: None)
    assert "continual_task_arithmetic" not in calls and "continual_average" not in calls
    assert {"continual_ties", "opcm"} <= set(calls)
    done = {"sequential": out}
    assert task_merging.sequential_done(done, 2) and not task_merging.sequential_done(done, 3)
    assert "final_items" not in task_merging.without_items({"merges": {}, "sequential": out})["sequential"]


def test_other_orders_start_over(tmp_path, fake_steps):
    calls, _ = fake_steps
    out = {}
    orders = task_merging.task_orders(TASKS, 1, 2)
    task_merging.sequential(orders, None, tmp_path, OrderScorer(), out, lambda: None)
    calls.clear()
    task_merging.sequential(orders[:1], None, tmp_path, OrderScorer(), out, lambda: None)
    assert calls and all(len(v) == 1 for v in out["final_items"].values())


def run_with(finals: dict[str, list[dict[str, list[int]]]]) -> dict:
    return {"sequential": {"final_items": finals}}


def test_the_paired_difference_by_seed_and_order_is_the_hand_computed_one():
    opcm, ta = "OPCM (α=0.5)", "task arithmetic (λ=0.3)"
    # seed 0: order 1 +0.25 on task a only (+0.125 on the average), order 2 equal; seed 1: +0.25 on both orders
    s0 = {opcm: [{"a": [1, 1, 0, 0], "b": [1, 0, 0, 0]}, {"a": [1, 0, 1, 0], "b": [0, 0, 0, 0]}],
          ta: [{"a": [1, 0, 0, 0], "b": [1, 0, 0, 0]}, {"a": [1, 0, 1, 0], "b": [0, 0, 0, 0]}]}
    s1 = {opcm: [{"a": [1, 1, 1, 1], "b": [1, 1, 0, 0]}] * 2, ta: [{"a": [1, 1, 0, 0], "b": [1, 1, 0, 0]}] * 2}
    c = task_merging.sequential_difference({0: run_with(s0), 1: run_with(s1)}, opcm, ta)
    assert c["per_seed"]["0"]["per_order"] == pytest.approx([0.125, 0.0])
    assert c["per_seed"]["0"]["difference"] == pytest.approx(0.0625)
    assert c["per_seed"]["1"]["difference"] == pytest.approx(0.25)
    assert c["over_seeds"] == pytest.approx(seed_summary([0.0625, 0.25]))
    for x in c["per_seed"].values():
        assert x["low"] <= x["difference"] <= x["high"]
    # seed 1 gains two of task a's four items and loses none: no replicate is below 0 or above the gain of all four
    assert 0 <= c["per_seed"]["1"]["low"] and c["per_seed"]["1"]["high"] <= 0.5
    same = task_merging.sequential_difference({0: run_with({opcm: s0[ta], ta: s0[ta]})}, opcm, ta)["per_seed"]["0"]
    assert (same["difference"], same["low"], same["high"]) == (0, 0, 0)


def test_a_seed_without_both_methods_is_left_out():
    c = task_merging.sequential_difference({0: run_with({"OPCM (α=0.5)": [{"a": [1]}]}), 1: {}}, "OPCM (α=0.5)",
                                           "task arithmetic (λ=0.3)")
    assert c["per_seed"] == {} and c["over_seeds"]["n"] == 0


def test_the_table_prints_each_seed_and_order(capsys):
    opcm, ta = "OPCM (α=0.5)", "task arithmetic (λ=0.3)"
    s0 = {opcm: [{"a": [1, 1, 0, 0]}, {"a": [1, 1, 1, 0]}], ta: [{"a": [1, 0, 0, 0]}, {"a": [1, 1, 1, 0]}]}
    summary = {"methods": {}, "sequential_final": {opcm: seed_summary([0.5, 0.75])},
               "sequential_vs": {f"{opcm} − {ta}": task_merging.sequential_difference({0: run_with(s0)}, opcm, ta)}}
    task_merging.print_tables(summary, {0: {}})
    out = capsys.readouterr().out
    assert f"{opcm} − {ta}" in out and "0: +12.5 [" in out and "+25.0 +0.0" in out
