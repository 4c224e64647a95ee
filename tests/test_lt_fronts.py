"""benchmarks/lt_fronts.py: matched-target-gain interpolation of gain/retention fronts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lt_fronts  # noqa: E402


def test_at_gain_interpolates_between_the_bracketing_points():
    # unsorted on purpose: the front is read in gain order
    front = [(1.0, 0.90, (0.88, 0.92)), (0.2, 1.02, (1.00, 1.04)), (0.6, 0.98, (0.96, 1.00))]
    value, ci = lt_fronts.at_gain(front, 0.8)  # halfway between gains 0.6 and 1.0
    assert value == pytest.approx(0.94)
    assert ci == pytest.approx((0.92, 0.96))
    assert lt_fronts.at_gain(front, 0.6)[0] == pytest.approx(0.98)  # on a point: that point
    assert lt_fronts.at_gain(front, 0.3)[0] == pytest.approx(1.02 + 0.25 * (0.98 - 1.02))
    assert lt_fronts.at_gain(front, 1.1) is None and lt_fronts.at_gain(front, 0.1) is None  # no extrapolation


def test_interpolated_value_stays_between_its_neighbours():
    front = [(0.1, 1.0, None), (0.5, 0.7, None), (0.9, 0.95, None)]
    for level in [0.1 + 0.05 * i for i in range(17)]:
        value, ci = lt_fronts.at_gain(front, level)
        neighbours = [r for g, r, _ in front if g <= level][-1:] + [r for g, r, _ in front if g >= level][:1]
        assert min(neighbours) - 1e-12 <= value <= max(neighbours) + 1e-12
        assert ci is None


def test_common_levels_lie_where_every_front_has_points():
    fronts = {"a": [(0.1, 1, None), (0.9, 1, None)], "b": [(0.3, 1, None), (1.2, 1, None)], "single": [(5.0, 1, None)]}
    assert lt_fronts.common_levels(fronts, 3) == pytest.approx([0.3, 0.6, 0.9])
    assert lt_fronts.common_levels({"a": [(0, 1, None), (0.1, 1, None)], "b": [(0.5, 1, None), (0.9, 1, None)]}) == []


def test_seed_summary_and_envelope():
    s = lt_fronts.seed_summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0) and s["n"] == 3
    assert lt_fronts.seed_summary([0.5])["sd"] is None
    assert lt_fronts.interval_envelope([(0.9, 1.0), (0.95, 1.05)]) == (0.9, 1.05)
    assert lt_fronts.interval_envelope([(0.9, 1.0), None]) is None


def test_seed_summary_interval_is_the_t_interval_of_the_mean():
    # values 1, 2, 3: mean 2, sd 1; t(0.975, 2) = 4.302652729749464 (tables), half-width 4.3027 / sqrt(3)
    s = lt_fronts.seed_summary([1.0, 2.0, 3.0])
    half = 4.302652729749464 / 3 ** 0.5
    assert (s["low"], s["high"]) == pytest.approx((2 - half, 2 + half))
    assert lt_fronts.seed_summary([0.5])["low"] is None


def _row(label, lr, seed, gain, retention, wordnet=1.0):
    return {"label": label, "lr": lr, "seed": seed, "target_gain": gain, "prose_retention": retention,
            "wordnet_ratio": wordnet}


def test_seed_differences_pair_each_methods_main_row_with_the_reference_by_seed():
    import lt_report

    rows = [_row("full", 1e-4, s, 3.0 + s, 0.96 - 0.01 * s) for s in (0, 1, 2)]
    rows += [_row("full", 3e-4, 0, 5.0, 0.80)]  # a sweep point: one seed, never the main row
    rows += [_row("lora", 2e-3, s, 2.0 + s, 0.99 - 0.01 * s + 0.005 * (s == 2)) for s in (2, 1, 0)]
    rows += [_row("lora", 5e-3, 0, 2.5, 0.5)]
    rows += [_row("hft", 1e-4, 0, 2.9, 0.97)]  # one seed: no pair to speak of
    found = lt_report.seed_differences(rows, "full")
    assert set(found) == {"lora"}
    lora = found["lora"]
    assert lora["lr"] == 2e-3 and lora["seeds"] == [0, 1, 2]
    assert lora["target_gain"]["mean"] == pytest.approx(-1.0) and lora["target_gain"]["sd"] == pytest.approx(0.0)
    diffs = [0.03, 0.03, 0.035]  # per seed, paired: lora's 0.99 − 0.01 s (+ 0.005 at seed 2) minus full's 0.96 − 0.01 s
    assert lora["prose_retention"]["mean"] == pytest.approx(sum(diffs) / 3)
    assert lora["prose_retention"]["low"] < sum(diffs) / 3 < lora["prose_retention"]["high"]
    # unpaired (seed order shuffled) the spread would differ: pairing is by seed, not by position
    assert lora["prose_retention"]["sd"] == pytest.approx(0.0028867513, rel=1e-6)


def test_main_steps_is_the_pilots_length_only_when_its_final_checkpoint_forgets():
    import lt_report

    def point(step, ci):
        return {"step": step, "prose_retention_ci": ci}

    forgetting_midway = {"steps": 400, "curve": [point(300, [0.95, 0.98]), point(400, [0.98, 1.01])]}
    assert lt_report.main_steps(forgetting_midway) is None  # a checkpoint inside the run is not a 300-step run
    assert lt_report.main_steps({"steps": 400, "curve": [point(300, [0.99, 1.02]), point(400, [0.95, 0.99])]}) == 400
    assert lt_report.main_steps({"steps": 500, "curve": [point(400, [0.9, 0.95])]}) is None  # stopped before its end
    assert lt_report.main_steps({"steps": 400, "curve": [point(400, None)]}) is None
