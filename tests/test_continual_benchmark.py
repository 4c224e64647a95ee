"""benchmarks/continual_finetuning.py: the continual-learning metrics against a hand-computed matrix,
the paired bootstrap, and the replay data of the shared-label-space rehearsal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from continual_metrics import accuracy_rows, bootstrap, interval, metrics  # noqa: E402

ORDER = ["a", "b", "c"]
# R[i][j]: accuracy on task j after learning the i-th task of ORDER (hand-picked)
ROWS = [{"a": 0.9}, {"a": 0.6, "b": 0.8}, {"a": 0.5, "b": 0.7, "c": 0.9}]
EXPERT = {"a": 0.9, "b": 0.9, "c": 0.8}


def items(acc: float, n: int = 10) -> list[int]:
    k = round(acc * n)
    return [1] * k + [0] * (n - k)


def test_metrics_hand_computed():
    m = metrics(ROWS, ORDER, EXPERT)
    assert m["acc"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)  # the last task has no backward transfer
    assert m["fwt"] == pytest.approx(((0.9 - 0.9) + (0.8 - 0.9) + (0.9 - 0.8)) / 3)


def test_metrics_single_task_and_wrong_length():
    m = metrics([{"a": 0.7}], ["a"], {"a": 0.8})
    assert m["acc"] == pytest.approx(0.7) and np.isnan(m["bwt"]) and m["fwt"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="rows"):
        metrics(ROWS[:2], ORDER, EXPERT)


def test_bootstrap_is_paired_and_centred():
    item_rows = [{t: items(acc) for t, acc in row.items()} for row in ROWS]
    expert = {t: items(acc) for t, acc in EXPERT.items()}
    assert accuracy_rows(item_rows) == ROWS
    reps = bootstrap(item_rows, ORDER, expert, 4000, seed=0)
    again = bootstrap(item_rows, ORDER, expert, 4000, seed=0)
    point = metrics(ROWS, ORDER, EXPERT)
    for name in ("acc", "bwt", "fwt"):
        assert reps[name].shape == (4000,)
        assert np.array_equal(reps[name] - again[name], np.zeros(4000))  # same draws: a method minus itself is 0
        lo, hi = interval(reps[name])
        assert lo < point[name] < hi
        assert abs(reps[name].mean() - point[name]) < 0.01
    # a different method on the same items: its difference moves by exactly the accuracy it changed
    better = [dict(r) for r in item_rows]
    better[2] = {**better[2], "a": [1] * 10}
    diff = bootstrap(better, ORDER, expert, 4000, seed=0)["acc"] - reps["acc"]
    assert interval(diff)[0] > 0
    with pytest.raises(ValueError, match="items"):
        bootstrap([{"a": [1, 0]}], ["a"], {"a": [1, 0, 1]}, 10, seed=0)


def test_replay_data_is_stratified_and_prefixed(tmp_path):
    from continual_finetuning import REPLAY_FRACTION, replay_data

    tasks = {
        "a": {"train": [{"text": f"a{i}", "label": "x" if i % 2 else "y"} for i in range(40)]},
        "b": {"train": [{"text": f"b{i}", "label": ["p", "q", "r"][i % 3]} for i in range(60)]},
        "c": {"train": [{"text": f"c{i}", "label": "z" if i % 2 else "w"} for i in range(30)]},
    }
    label2id = {"a": {"x": 0, "y": 1}, "b": {"p": 0, "q": 1, "r": 2}, "c": {"w": 0, "z": 1}}
    ctx = SimpleNamespace(order=["c", "a", "b"], tasks=tasks, experts=SimpleNamespace(label2id=label2id), seed=3)
    first = [json.loads(x) for x in replay_data(ctx, 1, tmp_path / "1.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in first) == sorted(f"c/{r['label']}" for r in tasks["c"]["train"])
    rows = [json.loads(x) for x in replay_data(ctx, 3, tmp_path / "3.jsonl").read_text().splitlines()]
    new = [r for r in rows if r["label"].startswith("b/")]
    old = [r for r in rows if not r["label"].startswith("b/")]
    assert len(new) == 60
    per_class = {label: sum(r["label"] == label for r in old) for label in ("c/w", "c/z", "a/x", "a/y")}
    assert set(per_class.values()) == {5}  # every earlier class equally: 60 * 1/3 / 4 classes
    assert abs(len(old) / len(rows) - REPLAY_FRACTION) < 0.05
    assert len({r["text"] for r in old}) == len(old)  # drawn without replacement


def test_opcm_is_compared_with_the_continual_merging_baselines_paired_by_seed():
    """Besides every run against sequential full fine-tuning, OPCM gets its paper's comparison: OPCM minus each
    continual merging baseline, per seed on the same test items, then over seeds (only seeds that have both)."""
    from continual_finetuning import seed_metrics, summarize

    expert = {t: items(acc, 100) for t, acc in EXPERT.items()}

    def run(rows):
        return {"steps": [{"test_items": {t: items(acc, 100) for t, acc in row.items()}, "seconds": 1.0} for row in rows]}

    better = [ROWS[0], ROWS[1], {**ROWS[2], "a": 0.8}]  # OPCM: task a kept at 0.8 instead of 0.5 at the end
    seeds = {}
    for seed, labels in ((0, ("full", "opcm", "continual_ta")), (1, ("full", "opcm", "continual_ta")), (2, ("full", "opcm"))):
        runs = {label: run(better if label == "opcm" else ROWS) for label in labels}
        seeds[seed] = seed_metrics({"order": ORDER, "experts": expert, "runs": runs})
    first = seeds[0]["opcm"]["vs_continual_ta"]
    assert first["acc"] == pytest.approx(0.3 / 3) and first["bwt"] == pytest.approx(0.3 / 2) and first["fwt"] == 0
    low, high = seeds[0]["opcm"]["vs_continual_ta_interval"]["acc"]
    assert 0 < low < 0.1 < high
    assert "vs_continual_ties" not in seeds[0]["opcm"]  # no continual TIES run: no comparison
    summary = summarize(seeds)
    assert summary["opcm"]["vs_continual_ta"]["acc"]["n"] == 2  # seed 2 has no continual_ta run
    assert summary["opcm"]["vs_full"]["acc"]["n"] == 3
    assert summary["opcm"]["vs_continual_ta"]["acc"]["mean"] == pytest.approx(0.1)
