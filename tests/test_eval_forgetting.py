"""Forgetting metrics on constructed results: flips, retention, forgetting score, BWT."""

from __future__ import annotations

import pytest

from deltawise.errors import InputError
from deltawise.eval.forgetting import accuracy_matrix, backward_transfer, flips, forgetting
from deltawise.eval.results import DatasetResult, EvalResult


def ds(name, role, value, *, ppl=False, per_item=None):
    import math

    return DatasetResult(
        name=name, role=role, task="perplexity" if ppl else "classification", path=name,
        metric="perplexity" if ppl else "accuracy", value=value, higher_is_better=not ppl,
        mean_nll=math.log(value) if ppl else None, per_item=per_item,
    )


def result(model, datasets):
    return EvalResult(model=model, fingerprint=model * 4, created="2025-01-01T00:00:00+00:00", datasets=datasets)


BASE_ITEMS = {"0": 1, "1": 1, "2": 0, "3": 1, "4": 0}
MODEL_ITEMS = {"0": 1, "1": 0, "2": 1, "3": 0, "4": 0}


def test_negative_flips_on_constructed_example():
    neg = flips(BASE_ITEMS, MODEL_ITEMS)
    assert neg.ids == ["1", "3"] and neg.count == 2
    assert neg.rate == pytest.approx(2 / 3)  # of the three items the base got right
    pos = flips(BASE_ITEMS, MODEL_ITEMS, negative=False)
    assert pos.ids == ["2"] and pos.rate == pytest.approx(1 / 2)


def test_flips_refuse_different_items():
    with pytest.raises(InputError, match="same data"):
        flips({"0": 1}, {"1": 1})


def test_forgetting_summary_numbers():
    base = result("base", [ds("en", "source", 10.0, ppl=True), ds("qa", "source", 0.8, per_item=BASE_ITEMS),
                           ds("de", "target", 20.0, ppl=True)])
    model = result("ft", [ds("en", "source", 12.5, ppl=True), ds("qa", "source", 0.9, per_item=MODEL_ITEMS),
                          ds("de", "target", 10.0, ppl=True)])
    f = forgetting(model, base)
    en, qa, de = f.datasets
    assert en.ratio == pytest.approx(0.8) and en.difference == pytest.approx(-2.5)
    assert qa.ratio == pytest.approx(1.125) and qa.difference == pytest.approx(0.1)
    assert qa.negative_flips.ids == ["1", "3"]
    assert de.gain == pytest.approx(0.6931, abs=1e-4)  # ln 2 nats/token of NLL removed
    assert f.target_gain == pytest.approx(1.0)  # perplexity halved: twice as good
    assert f.source_retention == pytest.approx((0.8 + 1.125) / 2)
    # English lost 20%, QA lost nothing: the mean loss is 10%
    assert f.forgetting_score == pytest.approx(10.0)


def test_forgetting_needs_same_datasets():
    with pytest.raises(InputError, match="no result for dataset"):
        forgetting(result("ft", [ds("x", "source", 0.5)]), result("base", [ds("y", "source", 0.5)]))


def test_backward_transfer_on_constructed_matrix():
    acc = [[0.9, 0.1, 0.2],
           [0.7, 0.8, 0.1],
           [0.6, 0.5, 0.9]]
    # ((0.6 - 0.9) + (0.5 - 0.8)) / 2
    assert backward_transfer(acc) == pytest.approx(-0.3)
    assert backward_transfer([[0.5, 0.0], [0.7, 0.9]]) == pytest.approx(0.2)
    with pytest.raises(InputError):
        backward_transfer([[1.0]])


def test_accuracy_matrix_from_results():
    runs = [result(f"after{i}", [ds("a", "target", a), ds("b", "target", b)])
            for i, (a, b) in enumerate([(0.9, 0.2), (0.6, 0.8)])]
    assert accuracy_matrix(runs, ["a", "b"]) == [[0.9, 0.2], [0.6, 0.8]]
    assert backward_transfer(accuracy_matrix(runs, ["a", "b"])) == pytest.approx(-0.3)
