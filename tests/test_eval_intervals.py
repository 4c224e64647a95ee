"""Paired bootstrap intervals: against closed forms, seeded, paired, and carried through eval's JSON and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deltawise.errors import InputError
from deltawise.eval.forgetting import forgetting
from deltawise.eval.intervals import IntervalSettings, bootstrap_mean, percentile
from deltawise.eval.results import DatasetResult, EvalResult


def test_interval_of_a_mean_matches_the_normal_interval_of_known_variance():
    # n draws of N(0, sigma^2): the 95% interval of the mean is xbar +- 1.96 s / sqrt(n), the bootstrap
    # standing in the sample's own spread s for sigma
    rng = np.random.default_rng(1)
    n, sigma = 400, 2.0
    x = rng.normal(0.0, sigma, n)
    lo, hi = percentile(bootstrap_mean(x, IntervalSettings(replicates=8000)), 0.95)
    half = 1.96 * x.std() / math.sqrt(n)
    assert (lo, hi) == pytest.approx((x.mean() - half, x.mean() + half), abs=0.06 * half)
    assert x.std() == pytest.approx(sigma, rel=0.1)  # and s is close to the known sigma


def test_the_interval_covers_the_true_mean_at_about_its_level():
    rng = np.random.default_rng(2)
    covered = 0
    trials = 200
    for t in range(trials):
        x = rng.normal(1.0, 1.0, 60)
        lo, hi = percentile(bootstrap_mean(x, IntervalSettings(replicates=500, bootstrap_seed=t)), 0.9)
        covered += lo <= 1.0 <= hi
    assert 0.82 <= covered / trials <= 0.96  # 90% nominal; the percentile interval runs a little narrow at n = 60


def test_same_seed_same_interval_other_seed_other_interval():
    x = np.random.default_rng(0).normal(size=50)
    a = percentile(bootstrap_mean(x, IntervalSettings(bootstrap_seed=3)), 0.95)
    assert a == percentile(bootstrap_mean(x, IntervalSettings(bootstrap_seed=3)), 0.95)
    assert a != percentile(bootstrap_mean(x, IntervalSettings(bootstrap_seed=4)), 0.95)


def test_settings_refuse_nonsense():
    with pytest.raises(InputError, match="confidence level"):
        IntervalSettings(level=1.0)
    with pytest.raises(InputError, match="replicates"):
        IntervalSettings(replicates=10)


def accuracy(name, role, items):
    return DatasetResult(name=name, role=role, task="classification", path=name, metric="accuracy",
                         value=sum(items.values()) / len(items), higher_is_better=True, per_item=items)


def perplexity(name, role, nll, tokens):
    ids = [str(i) for i in range(len(nll))]
    mean = sum(nll) / sum(tokens)
    return DatasetResult(name=name, role=role, task="perplexity", path=name, metric="perplexity", value=math.exp(mean),
                         higher_is_better=False, mean_nll=mean, n_tokens=sum(tokens), n_items=len(nll),
                         per_item_nll=dict(zip(ids, nll)), per_item_tokens=dict(zip(ids, tokens)))


def result(model, datasets):
    return EvalResult(model=model, fingerprint=model, created="2026-01-01T00:00:00+00:00", datasets=datasets)


def test_accuracy_difference_interval_matches_the_binomial_interval():
    # the base gets every item right, so the paired difference is the model's accuracy minus 1:
    # its interval is p_hat - 1 +- 1.96 sqrt(p_hat (1 - p_hat) / n)
    rng = np.random.default_rng(5)
    n = 500
    right = rng.random(n) < 0.8
    base = accuracy("qa", "source", {str(i): 1.0 for i in range(n)})
    model = accuracy("qa", "source", {str(i): float(r) for i, r in enumerate(right)})
    comp = forgetting(result("ft", [model]), result("base", [base]), IntervalSettings(replicates=4000)).datasets[0]
    p = right.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert comp.difference_ci == pytest.approx((p - 1 - half, p - 1 + half), abs=0.12 * half)
    assert comp.negative_flips.rate_ci == pytest.approx((1 - p - half, 1 - p + half), abs=0.12 * half)


def test_pairing_makes_a_constant_shift_exact():
    # the model is exactly 10% better on every item: every paired replicate has the same ratio, so the
    # interval collapses on it (an unpaired bootstrap would give a wide interval here)
    rng = np.random.default_rng(6)
    nll = list(rng.gamma(2.0, 20.0, 300))
    tokens = list(rng.integers(10, 60, 300))
    base = perplexity("en", "source", nll, tokens)
    model = perplexity("en", "source", [v - 0.1 * t for v, t in zip(nll, tokens)], tokens)
    f = forgetting(result("ft", [model]), result("base", [base]))
    lo, hi = f.datasets[0].ratio_ci
    assert lo == pytest.approx(math.exp(0.1)) and hi == pytest.approx(math.exp(0.1))
    assert f.forgetting_score == 0.0 and f.forgetting_score_ci == (0.0, 0.0)


def test_averages_over_datasets_have_intervals_that_contain_their_point_estimates():
    rng = np.random.default_rng(7)

    def pair(name, role, shift):
        nll = list(rng.gamma(2.0, 20.0, 200))
        tokens = list(rng.integers(10, 60, 200))
        noisy = [v + shift * t + rng.normal(0, 5) for v, t in zip(nll, tokens)]
        return perplexity(name, role, nll, tokens), perplexity(name, role, noisy, tokens)

    (b1, m1), (b2, m2), (b3, m3) = pair("en", "source", 0.05), pair("code", "source", -0.02), pair("de", "target", -0.3)
    f = forgetting(result("ft", [m1, m2, m3]), result("base", [b1, b2, b3]))
    for value, ci in ((f.target_gain, f.target_gain_ci), (f.source_retention, f.source_retention_ci),
                      (f.forgetting_score, f.forgetting_score_ci)):
        assert ci[0] <= value <= ci[1]
    assert f.source_retention_lower is not None and f.source_retention_ci[0] <= f.source_retention_lower <= f.source_retention
    assert f.intervals == {"method": "paired percentile bootstrap over items", "level": 0.95, "replicates": 2000, "seed": 0}


def test_a_dataset_without_per_item_scores_gets_no_interval_nor_does_its_average():
    base = DatasetResult(name="task", role="source", task="lm_eval", path="task", metric="acc", value=0.5,
                         higher_is_better=True)
    model = base.model_copy(update={"value": 0.4})
    f = forgetting(result("ft", [model]), result("base", [base]))
    assert f.datasets[0].ratio_ci is None and f.source_retention_ci is None and f.forgetting_score == pytest.approx(20.0)


def test_different_items_are_refused():
    base = accuracy("qa", "source", {"0": 1.0, "1": 1.0})
    model = accuracy("qa", "source", {"0": 1.0, "2": 1.0})
    with pytest.raises(InputError, match="same data"):
        forgetting(result("ft", [model]), result("base", [base]))


def test_eval_cli_writes_and_prints_the_intervals(tmp_path):
    """``deltawise eval --baseline`` on a real (tiny) model: per-item NLLs are kept, intervals are in the
    JSON and on the screen, and the flags set the level and the seed."""
    from typer.testing import CliRunner

    from deltawise.cli import app
    from eval_util import save_tiny_lm

    eval_llama = save_tiny_lm(tmp_path / "lm")
    data = tmp_path / "en.txt"
    data.write_text("\n\n".join(f"the cat sat on mat number {i} and looked at the door" for i in range(40)))
    runner = CliRunner()
    base = runner.invoke(app, ["eval", str(eval_llama), "--source", str(data), "-o", str(tmp_path / "base.json"), "-q"])
    assert base.exit_code == 0, base.output
    saved = json.loads((tmp_path / "base.json").read_text())["datasets"][0]
    assert len(saved["per_item_nll"]) == 40 and sum(saved["per_item_tokens"].values()) == saved["n_tokens"]
    again = runner.invoke(app, ["eval", str(eval_llama), "--source", str(data), "-o", str(tmp_path / "ft.json"), "-q",
                                "--baseline", str(tmp_path / "base.json"), "--confidence", "0.9", "--bootstrap-seed", "4"],
                          terminal_width=200)
    assert again.exit_code == 0, again.output
    f = json.loads((tmp_path / "ft.json").read_text())["forgetting"]
    assert f["intervals"]["level"] == 0.9 and f["intervals"]["seed"] == 4
    assert f["source_retention_ci"] == [1.0, 1.0]  # the same model: every replicate retains everything
    assert "source retention: 1.0000 [1.0000, 1.0000]" in again.output and "90% paired bootstrap" in again.output
