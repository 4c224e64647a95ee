"""benchmarks/lt_fronts.py: matched-target-gain interpolation of gain/retention fronts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from deltawise.eval.intervals import IntervalSettings, PairedSample

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
    from rich.console import Console

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
    from rich.console import Console

    def point(step, ci):
        return {"step": step, "prose_retention_ci": ci}

    forgetting_midway = {"steps": 400, "curve": [point(300, [0.95, 0.98]), point(400, [0.98, 1.01])]}
    assert lt_report.main_steps(forgetting_midway) is None  # a checkpoint inside the run is not a 300-step run
    assert lt_report.main_steps({"steps": 400, "curve": [point(300, [0.99, 1.02]), point(400, [0.95, 0.99])]}) == 400
    assert lt_report.main_steps({"steps": 500, "curve": [point(400, [0.9, 0.95])]}) is None  # stopped before its end
    assert lt_report.main_steps({"steps": 400, "curve": [point(400, None)]}) is None


def _sample(base_nll: np.ndarray, nll: np.ndarray, tokens: float = 10.0) -> PairedSample:
    t = np.full(len(base_nll), tokens)
    return PairedSample("perplexity", base_nll, nll, t, t.copy())


def _run(gain: float, retention: float, n_target: int = 40, n_source: int = 30, noise: float = 0.0, seed: int = 0):
    """A run whose every item has the given gain and retention (ratio exp((base nll − nll) / tokens)), plus noise."""
    rng = np.random.default_rng(seed)
    base_t, base_s = np.full(n_target, 20.0), np.full(n_source, 20.0)
    nll_t = base_t - 10 * np.log1p(gain) + noise * rng.standard_normal(n_target)
    nll_s = base_s - 10 * np.log(retention) + noise * rng.standard_normal(n_source)
    return _sample(base_t, nll_t), _sample(base_s, nll_s)


SETTINGS = IntervalSettings(level=0.95, replicates=400, bootstrap_seed=0)


def test_matched_difference_of_noiseless_fronts_is_the_hand_computed_one_with_no_spread():
    a = [_run(0.5, 0.95), _run(1.0, 0.85)]  # at gain 0.75: 0.90
    b = [_run(1.2, 0.94), _run(0.6, 1.00)]  # unsorted; at 0.75: 1.00 + 0.25 · (0.94 − 1.00) = 0.985
    found = lt_fronts.matched_difference(a, b, 0.375, SETTINGS)  # the overlap is [0.6, 1.0]: 0.375 of it is 0.75
    assert found["level"] == pytest.approx(0.75)
    assert found["a"] == pytest.approx(0.90) and found["b"] == pytest.approx(0.985)
    assert found["difference"] == pytest.approx(-0.085)
    assert found["difference_ci"] == pytest.approx((-0.085, -0.085))  # every draw is the same items' values
    assert found["dropped"] == 0
    apart = lt_fronts.matched_difference(a, [_run(1.5, 0.8), _run(2.0, 0.7)], 0.5, SETTINGS)  # no gain in common
    assert np.isnan(apart["difference"]) and apart["difference_ci"] is None and apart["dropped"] == SETTINGS.replicates
    with pytest.raises(ValueError, match="two or more runs"):
        lt_fronts.matched_difference(a[:1], b[:1], 0.5, SETTINGS)


def test_a_one_run_front_is_compared_at_its_own_gain_whatever_the_position():
    b = [_run(1.2, 0.94), _run(0.6, 1.00)]  # at 0.75: 0.985 (as above)
    for position in (0.0, 0.5, 1.0):
        found = lt_fronts.matched_difference([_run(0.75, 0.90)], b, position, SETTINGS)
        assert found["level"] == pytest.approx(0.75) and found["difference"] == pytest.approx(0.90 - 0.985)
        assert found["difference_ci"] == pytest.approx((-0.085, -0.085)) and found["dropped"] == 0
    reverse = lt_fronts.matched_difference(b, [_run(0.75, 0.90)], 0.5, SETTINGS)
    assert reverse["difference"] == pytest.approx(0.085)
    outside = lt_fronts.matched_difference([_run(1.5, 0.9)], b, 0.5, SETTINGS)  # beyond b's gains: nothing to compare
    assert np.isnan(outside["difference"]) and outside["dropped"] == SETTINGS.replicates


def test_a_one_run_front_near_the_end_of_the_other_drops_the_replicates_where_it_falls_outside():
    b = [_run(0.6, 1.00, noise=1.0, seed=1), _run(1.2, 0.94, noise=1.0, seed=2)]
    found = lt_fronts.matched_difference([_run(0.61, 0.97, noise=1.0, seed=3)], b, 0.5, SETTINGS)
    assert 0 < found["dropped"] < SETTINGS.replicates  # the point's gain and b's low end move with the drawn items
    low, high = found["difference_ci"]
    assert low < found["difference"] < high


def test_matched_difference_is_zero_against_itself_antisymmetric_and_seeded():
    a = [_run(0.5, 0.95, noise=2.0, seed=1), _run(1.0, 0.85, noise=2.0, seed=2)]
    b = [_run(0.4, 1.00, noise=2.0, seed=3), _run(1.1, 0.90, noise=2.0, seed=4)]
    same = lt_fronts.matched_difference(a, a, 0.5, SETTINGS)
    assert same["difference"] == 0 and same["difference_ci"] == (0.0, 0.0)
    ab, ba = (lt_fronts.matched_difference(x, y, 0.5, SETTINGS) for x, y in ((a, b), (b, a)))
    assert ab["level"] == pytest.approx(ba["level"]) and ab["difference"] == pytest.approx(-ba["difference"])
    assert ab["difference_ci"] == pytest.approx((-ba["difference_ci"][1], -ba["difference_ci"][0]))
    low, high = ab["difference_ci"]
    assert low < ab["difference"] < high and high - low > 0.005  # item noise widens it
    assert ab["dropped"] == 0  # the fronts overlap in every draw
    assert lt_fronts.matched_difference(a, b, 0.5, SETTINGS) == ab  # the same seed, the same interval


def test_the_interval_covers_a_true_difference_in_most_simulated_samples():
    """Item noise drawn anew 40 times around fronts whose true difference at the matched gain is -0.085: the 95%
    interval should contain it in most samples (a loose check of calibration, not an exact coverage)."""
    settings = IntervalSettings(level=0.95, replicates=200, bootstrap_seed=0)
    covered = 0
    for k in range(40):
        a = [_run(0.5, 0.95, noise=1.0, seed=4 * k), _run(1.0, 0.85, noise=1.0, seed=4 * k + 1)]
        b = [_run(1.2, 0.94, noise=1.0, seed=4 * k + 2), _run(0.6, 1.00, noise=1.0, seed=4 * k + 3)]
        low, high = lt_fronts.matched_difference(a, b, 0.375, settings)["difference_ci"]
        covered += low <= -0.085 <= high
    assert covered >= 32


def test_the_report_pairs_each_swept_method_with_full_at_the_seed_both_swept():
    import lt_report
    from rich.console import Console

    def row(label, lr, seed, gain, retention, tool=None):
        return {"key": f"{label}_{lr}_s{seed}", "label": label, "lr": lr, "seed": seed, "target_gain": gain, "tool": tool}

    runs = {("full", 1e-4, 0): (1.0, 0.85), ("full", 3e-5, 0): (0.5, 0.95), ("full", 1e-4, 1): (1.0, 0.84),
            ("lora", 2e-3, 0): (1.2, 0.94), ("lora", 5e-4, 0): (0.6, 1.00), ("lora", 2e-3, 1): (1.2, 0.93),
            ("hft", 1e-4, 0): (0.9, 1.0), ("english-only", 1e-4, 0): (0.1, 1.1)}
    rows = [row(label, lr, seed, *values) for (label, lr, seed), values in runs.items()]
    rows.append(row("full-guard", 1e-4, 0, 1.0, 0.9, tool={"choice": "x"}))
    samples = {r["key"]: _run(*runs[(r["label"], r["lr"], r["seed"])]) for r in rows if r["tool"] is None}
    found = lt_report.matched_pairs(rows, samples)
    assert [(f["method"], f["seed"], f["position"]) for f in found] == [
        *[("lora", 0, p) for p in lt_fronts.POSITIONS], ("lora", 0, None), ("hft", 0, None)]  # hft: one run, at its own gain
    # each lora run inside full's gains [0.5, 1.0] at its own gain: 5e-4 (0.6), not 2e-3 (1.2); full there 0.95 - 0.1·0.2
    own = found[3]
    assert own["rates"] == [5e-4] and own["level"] == pytest.approx(0.6) and own["difference"] == pytest.approx(1.00 - 0.93)
    assert found[-1]["level"] == pytest.approx(0.9) and found[-1]["difference"] == pytest.approx(1.0 - (0.95 - 0.8 * 0.10))
    assert found[0]["rates"] == [5e-4, 2e-3] and found[0]["against_rates"] == [3e-5, 1e-4]
    middle = found[1]  # the overlap [0.6, 1.0]: gain 0.8; lora 1.00 - (0.2/0.6)·0.06 = 0.98, full 0.95 - 0.6·0.10 = 0.89
    assert middle["level"] == pytest.approx(0.8) and middle["difference"] == pytest.approx(0.98 - 0.89)
    console = Console(record=True, width=200)
    console.print(lt_report.matched_pairs_table(found))
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in console.export_text().splitlines() if line.startswith("│")]
    assert ["lora", "0", "0.5", "+0.800", "0.890", "0.980", "+0.090 [0.090, 0.090]", ""] in cells
    assert ["hft", "0", "its 0.0001 run's gain", "+0.900", "0.870", "1.000", "+0.130 [0.130, 0.130]", ""] in cells
    assert ["lora", "0", "its 0.0005 run's gain", "+0.600", "0.930", "1.000", "+0.070 [0.070, 0.070]", ""] in cells


def test_each_run_of_a_forgetting_budget_row_is_compared_with_full_at_its_own_gain():
    import lt_report

    def row(label, lr, tool=None):
        return {"key": f"{label}_{lr}_s0", "label": label, "lr": lr, "seed": 0, "target_gain": runs[(label, lr)][0],
                "tool": tool}

    # full-guard at 3e-4 has less gain than at 1e-4: a sweep's front would end at 1e-4, a tool row keeps both runs
    runs = {("full", 3e-5): (0.5, 0.95), ("full", 1e-4): (1.0, 0.85), ("full-guard", 1e-4): (0.9, 0.99),
            ("full-guard", 3e-4): (0.6, 1.00)}
    rows = [row(label, lr, {"choice": "x"} if label == "full-guard" else None) for label, lr in runs]
    samples = {r["key"]: _run(*runs[(r["label"], r["lr"])]) for r in rows}
    assert [f["method"] for f in lt_report.matched_pairs(rows, samples)] == []  # not among the methods by default
    found = lt_report.matched_pairs(rows, samples, methods=["full-guard"])
    assert [(f["rates"], f["position"]) for f in found] == [([1e-4], None), ([3e-4], None)]
    # full at 0.9: 0.95 − 0.4·0.2 = 0.87; at 0.6: 0.93
    assert [f["difference"] for f in found] == [pytest.approx(0.99 - 0.87), pytest.approx(1.00 - 0.93)]


def test_replayed_methods_are_also_compared_with_full_fine_tuning_on_the_same_replay():
    import lt_report
    from rich.console import Console

    def row(label, lr, seed):
        return {"key": f"{label}_{lr}_s{seed}", "label": label, "lr": lr, "seed": seed, "target_gain": runs[(label, lr)][0],
                "tool": None}

    runs = {("full", 3e-5): (2.8, 1.05), ("full", 1e-4): (3.6, 0.96), ("full-replay", 3e-5): (2.5, 1.29),
            ("full-replay", 1e-4): (3.3, 1.23), ("bam-linear", 1e-4): (2.6, 1.25), ("sorsa", 3e-5): (1.3, 1.03)}
    rows = [row(label, lr, 0) for label, lr in runs]
    samples = {r["key"]: _run(*runs[(r["label"], r["lr"])]) for r in rows}
    console = Console(record=True, width=250)
    against_full = lt_report.matched_pairs(rows, samples)
    against_replay = lt_report.matched_pairs(rows, samples, lt_report.REPLAY_CONTROL, ["bam-linear"])
    by_method = {f["method"]: f for f in against_full if f["position"] in (None, 0.5)}
    assert by_method["bam-linear"]["difference"] is None and by_method["sorsa"]["difference"] is None  # below full's gains
    assert by_method["sorsa"]["level"] is None and by_method["sorsa"]["position"] is None
    (bam,) = against_replay
    # full-replay at gain 2.6: 1.29 + (0.1 / 0.8) · (1.23 − 1.29) = 1.2825
    assert bam["against"] == "full-replay" and bam["level"] == pytest.approx(2.6)
    assert bam["difference"] == pytest.approx(1.25 - 1.2825)
    console.print(lt_report.matched_pairs_table(against_full))
    assert "no gain in common with full's front" in console.export_text()


def test_a_front_ends_at_the_rate_with_the_most_gain():
    rows = [(5e-3, 2.63), (5e-4, 2.97), (2e-3, 3.53), (1e-4, 2.10)]  # 5e-3 diverged: less gain than 2e-3
    kept = lt_fronts.up_to_peak(rows, gain=lambda r: r[1], lr=lambda r: r[0])
    assert kept == [(1e-4, 2.10), (5e-4, 2.97), (2e-3, 3.53)]
    assert lt_fronts.up_to_peak([(1e-4, 1.0), (3e-4, 2.0)], gain=lambda r: r[1], lr=lambda r: r[0]) == [(1e-4, 1.0), (3e-4, 2.0)]
    assert lt_fronts.up_to_peak([], gain=lambda r: r[1], lr=lambda r: r[0]) == []


def test_every_seed_with_a_full_front_gets_its_own_pairs_and_a_rate_seen_at_several_seeds_an_interval_over_them():
    import lt_report
    from rich.console import Console

    def row(label, lr, seed):
        return {"key": f"{label}_{lr}_s{seed}", "label": label, "lr": lr, "seed": seed, "tool": None,
                "target_gain": runs[(label, lr, seed)][0]}

    # full swept at seeds 0 and 1, only one rate at seed 2 (no front there); lift at 2e-4 at all three seeds
    runs = {("full", 3e-5, 0): (0.5, 0.95), ("full", 1e-4, 0): (1.0, 0.85),
            ("full", 3e-5, 1): (0.4, 0.96), ("full", 1e-4, 1): (1.2, 0.80), ("full", 1e-4, 2): (1.0, 0.86),
            ("lift", 2e-4, 0): (0.9, 0.90), ("lift", 2e-4, 1): (0.8, 0.92), ("lift", 2e-4, 2): (0.9, 0.91)}
    rows = [row(*key) for key in runs]
    samples = {r["key"]: _run(*runs[(r["label"], r["lr"], r["seed"])]) for r in rows}
    found = lt_report.matched_pairs(rows, samples)
    assert [(f["method"], f["seed"], f["rates"]) for f in found] == [("lift", 0, [2e-4]), ("lift", 1, [2e-4])]
    # full at 0.9, seed 0: 0.95 − 0.8·0.10 = 0.87; at 0.8, seed 1: 0.96 − 0.5·0.16 = 0.88
    assert [f["difference"] for f in found] == [pytest.approx(0.90 - 0.87), pytest.approx(0.92 - 0.88)]
    (over,) = lt_report.matched_across_seeds(found)
    assert over["seeds"] == [0, 1] and over["lr"] == 2e-4
    assert over["difference"]["mean"] == pytest.approx(0.035) and over["level"]["mean"] == pytest.approx(0.85)
    # two seeds 0.03 and 0.04: sd 0.00707, t(0.975, 1) = 12.706 → half-width 12.706 · 0.00707 / √2 = 0.0635
    assert over["difference"]["low"] == pytest.approx(0.035 - 0.0635, abs=1e-4)
    assert over["difference"]["high"] == pytest.approx(0.035 + 0.0635, abs=1e-4)
    assert lt_report.matched_across_seeds(found[:1]) == []  # one seed: no interval over seeds
    console = Console(record=True, width=200)
    console.print(lt_report.matched_across_seeds_table([over]))
    assert "+0.035 [-0.029, +0.099]" in console.export_text()


def test_summarise_averages_the_seeds_training_seconds_and_a_budget_row_of_several_seeds_has_none():
    import lt_report

    def row(label, seed, seconds):
        measures = {key: 1.0 + seed / 10 for key in lt_report.MEASURES}
        cis = {key + "_ci": (0.9, 1.1) for key in lt_report.MEASURES}
        tool = {"choice": "λ 0.8"} if label == "full-guard" else None
        return {"label": label, "lr": 1e-4, "seed": seed, "seconds": seconds, "tool": tool, "budget": None,
                "cost": {"total": 10.0 + seed, "parts": {"train": 8.0 + seed}}, **measures, **cis}

    # the guard's seconds carry its stages, not "train": two seeds of them once failed in statistics.stdev on NaNs
    rows = [row("full", 0, {"train": 100.0}), row("full", 1, {"train": 300.0}),
            row("full-guard", 0, {"guarded": 2500.0}), row("full-guard", 1, {"guarded": 2400.0})]
    full, guard = lt_report.summarise(rows)
    assert full["train_seconds"] == pytest.approx(200.0)
    assert np.isnan(guard["train_seconds"])
    (partly,) = lt_report.summarise([row("full", 0, {"train": 100.0}), row("full", 1, {})])
    assert np.isnan(partly["train_seconds"])  # not seed 0's time passed off as the mean of both
    assert guard["cost"]["total"] == pytest.approx(10.5) and guard["choices"] == ["λ 0.8", "λ 0.8"]
    assert lt_report.choices_by_seed(guard) == "λ 0.8 (seeds 0, 1)"
    assert lt_report.choices_by_seed({"seeds": [0, 1, 2], "choices": ["a", "b", "a"]}) == "a (seeds 0, 2); b (seed 1)"
    assert guard["prose_retention"]["mean"] == pytest.approx(1.05) and guard["prose_retention"]["n"] == 2
