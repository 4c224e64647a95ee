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
