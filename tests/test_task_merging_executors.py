"""benchmarks/task_merging.py: a seed's (method, lambda) cells as executor jobs give the inline path's grid, choice
and test scores, and each cell's validation score is the hand-computed one of base + lambda * sum of task vectors.

The experts are three 4-vector "bodies" and the scorer a distance rule (tests/executor_jobs.py), so that the cells
cost a merge each; the local executor's workers still import torch (marked slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from executor_jobs import DistanceScorer
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from task_merging import GRID, run_method  # noqa: E402

from deltawise.options import ExecutorOptions  # noqa: E402

BASE, A, B = [0.0, 1.0, -1.0, 0.5], [0.2, 1.0, -0.6, 0.5], [0.0, 1.3, -1.0, 0.1]
TASKS = {"a": [0.1, 1.2, -0.8, 0.4], "b": [0.05, 1.25, -0.9, 0.2]}


@pytest.fixture()
def experts(tmp_path) -> dict[str, Path]:
    folders = {}
    for name, w in (("base", BASE), ("a", A), ("b", B)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.tensor(w)}, tmp_path / name / "model.safetensors")
        folders[name] = tmp_path / name
    return folders


def _run(experts, work: Path, executor=None) -> dict:
    expert_val = {"a": 0.5, "b": 0.25}
    return run_method("task_arithmetic", "task_arithmetic", {}, experts["base"], [experts["a"], experts["b"]], work,
                      DistanceScorer(TASKS), expert_val, executor=executor)


def _hand(lam: float) -> float:
    merged = [b + lam * ((a - b) + (c - b)) for b, a, c in zip(BASE, A, B)]
    acc = {t: 1.0 / (1.0 + sum(abs(m - x) for m, x in zip(merged, target))) for t, target in TASKS.items()}
    return (acc["a"] / 0.5 + acc["b"] / 0.25) / 2


def test_inline_cells_score_the_hand_computed_merges(experts, tmp_path):
    r = _run(experts, tmp_path / "work")
    assert [g["params"]["lambda"] for g in r["grid"]] == GRID
    assert [g["val_normalized"] for g in r["grid"]] == pytest.approx([_hand(lam) for lam in GRID], rel=1e-6)
    assert r["params"]["lambda"] == max(GRID, key=_hand)


@pytest.mark.slow
def test_local_cells_give_the_inline_results(experts, tmp_path):
    inline = _run(experts, tmp_path / "inline")
    local = _run(experts, tmp_path / "local", ExecutorOptions("local", jobs=2))
    assert local == inline


def test_a_choice_at_the_grid_top_extends_the_grid_until_it_falls(experts, tmp_path):
    # both tasks sit at base + 3 * (sum of task vectors): the score rises through GRID and peaks at 3.0
    far = [b + 3.0 * ((a - b) + (c - b)) for b, a, c in zip(BASE, A, B)]
    r = run_method("task_arithmetic", "task_arithmetic", {}, experts["base"], [experts["a"], experts["b"]],
                   tmp_path / "work", DistanceScorer({"a": far, "b": far}), {"a": 1.0, "b": 1.0})
    lambdas = [g["params"]["lambda"] for g in r["grid"]]
    assert lambdas == GRID + [2.5, 3.0, 4.0]  # 4.0 scores below 3.0, so the extension stops there
    assert r["params"]["lambda"] == 3.0
