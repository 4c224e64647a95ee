"""Each merge method against hand-computed results on small tensors, plus its defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from methods_util import run_method

T = lambda *x: torch.tensor(x, dtype=torch.float32)  # noqa: E731


# ------------------------------------------------------------------ linear
def test_linear_weighted_average_by_hand():
    out = run_method("linear", None, [T(1, 2), T(3, 6)], model_params=[{"weight": 1}, {"weight": 3}])
    assert torch.allclose(out, T((1 + 9) / 4, (2 + 18) / 4))


def test_linear_without_normalize_is_weighted_sum():
    out = run_method("linear", None, [T(1, 2), T(3, 6)], {"normalize": False}, [{"weight": 1}, {"weight": 3}])
    assert torch.equal(out, T(10, 20))


def test_linear_weights_summing_to_one_keep_a_constant_tensor():
    c = torch.full((3, 4), 0.7)
    out = run_method("linear", None, [c, c, c], {"normalize": False}, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}])
    assert torch.allclose(out, c, atol=1e-7)


def test_linear_one_model_returns_it():
    x = torch.randn(5, 3)
    assert torch.equal(run_method("linear", None, [x]), x)


# ------------------------------------------------------------------ task arithmetic
def test_task_arithmetic_by_hand():
    base = T(1, 1)
    out = run_method("task_arithmetic", base, [T(2, 1), T(1, 3)], {"lambda": 2.0}, [{"weight": 1}, {"weight": 0.5}])
    # base + 2 * (1*(1,0) + 0.5*(0,2)) = (3, 3)
    assert torch.allclose(out, T(3, 3))


def test_task_arithmetic_lambda_zero_returns_base_and_single_model_returns_it():
    base, ft = torch.randn(4, 4), torch.randn(4, 4)
    assert torch.equal(run_method("task_arithmetic", base, [ft], {"lambda": 0.0}), base)
    assert torch.allclose(run_method("task_arithmetic", base, [ft]), ft, atol=1e-6)


def test_task_arithmetic_negation_removes_the_task_vector():
    base, ft = torch.randn(6), torch.randn(6)
    out = run_method("task_arithmetic", base, [ft], model_params=[{"weight": -1.0}])
    assert torch.allclose(out, 2 * base - ft, atol=1e-6)


# ------------------------------------------------------------------ TIES
def test_ties_trim_elect_disjoint_mean_by_hand():
    base = torch.zeros(4)
    tau1, tau2 = T(3, -1, 0.5, -2), T(-2, -3, 0.25, 1)
    # density 0.5 keeps 2 of 4: tau1 -> (3, 0, 0, -2), tau2 -> (-2, -3, 0, 0)
    # elected signs from the sum (1, -3, 0, -2): (+, -, +, -); agreeing entries averaged
    out = run_method("ties", base, [tau1, tau2], model_params=[{"density": 0.5}] * 2)
    assert torch.equal(out, T(3, -3, 0, -2))


def test_ties_weighted_and_dis_sum_by_hand():
    base = T(1, 1, 1)
    tau1, tau2 = T(2, -1, 4), T(1, 2, -1)
    # density 1: no trim. weighted (2*tau1, 1*tau2) = (4,-2,8), (1,2,-1); sums (5,0,7) -> signs (+,+,+)
    # agreeing: e0 both (4+1)/(2+1); e1 only tau2 (2)/1 (zero sum elects +); e2 only tau1 8/2
    out = run_method("ties", base, [base + tau1, base + tau2], model_params=[{"weight": 2}, {"weight": 1}])
    assert torch.allclose(out, base + T(5 / 3, 2, 4))
    summed = run_method("ties", base, [base + tau1, base + tau2], {"normalize": False, "lambda": 0.5},
                        [{"weight": 2}, {"weight": 1}])
    assert torch.allclose(summed, base + 0.5 * T(5, 2, 8))


def test_ties_full_density_positive_vectors_equal_plain_average():
    base = torch.randn(10)
    taus = [torch.rand(10) + 0.1 for _ in range(3)]
    out = run_method("ties", base, [base + t for t in taus])
    assert torch.allclose(out, base + sum(taus) / 3, atol=1e-6)


def test_ties_keeps_max_1_int_density_n_entries_per_tensor():
    base = torch.zeros(100)
    tau = torch.randn(100)
    out = run_method("ties", base, [tau], model_params=[{"density": 0.137}])
    assert int((out != 0).sum()) == 13
    kept = out != 0
    assert tau.abs()[kept].min() > tau.abs()[~kept].max()
    tiny = run_method("ties", base, [tau], model_params=[{"density": 0.001}])
    assert int((tiny != 0).sum()) == 1  # at least one entry survives, as in mergekit


# ------------------------------------------------------------------ DARE
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_density_one_is_identity(method):
    base, ft = torch.randn(8, 8), torch.randn(8, 8)
    assert torch.allclose(run_method(method, base, [ft]), ft, atol=1e-6)


def test_dare_inverse_density_is_unbiased_over_seeds():
    base = torch.zeros(2000)
    tau = torch.randn(2000)
    params = {"rescale_mode": "inverse_density"}
    runs = torch.stack([run_method("dare_linear", base, [tau], params, [{"density": 0.3}], seed=s) for s in range(400)])
    kept_fraction = float((runs != 0).float().mean())
    assert abs(kept_fraction - 0.3) < 0.01
    # every kept value is tau / 0.3 exactly
    nz = runs != 0
    assert torch.allclose(runs[nz], (tau / 0.3).expand_as(runs)[nz], rtol=1e-6)
    # E[tau~] = tau: the standard error of the mean over 400 runs is |tau| * sqrt((1-p)/p/400)
    err = (runs.mean(0) - tau).abs()
    bound = 5 * tau.abs() * math.sqrt((1 - 0.3) / 0.3 / 400) + 1e-6
    assert bool((err <= bound).all())


def test_dare_l1_rescale_preserves_the_l1_norm_and_is_seeded():
    base = torch.randn(64, 32)
    ft = base + torch.randn(64, 32) * 0.01
    a = run_method("dare_linear", base, [ft], model_params=[{"density": 0.2}], seed=7)
    b = run_method("dare_linear", base, [ft], model_params=[{"density": 0.2}], seed=7)
    c = run_method("dare_linear", base, [ft], model_params=[{"density": 0.2}], seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose((a - base).abs().sum(), (ft - base).abs().sum(), rtol=1e-5)
    assert abs(float(((a - base) != 0).float().mean()) - 0.2) < 0.03


def test_dare_ties_elects_signs_of_dropped_vectors():
    base = torch.zeros(3)
    ft1, ft2 = T(1, -1, 2), T(-3, -1, 1)
    out = run_method("dare_ties", base, [ft1, ft2], {"rescale": False})  # density 1: nothing dropped
    # sums (-2, -2, 3) -> (-, -, +); normalize defaults to false for dare_ties: sums of agreeing
    assert torch.equal(out, T(-3, -2, 3))


# ------------------------------------------------------------------ Breadcrumbs
def test_breadcrumbs_tensor_band_by_hand():
    tau = torch.arange(1.0, 11.0)  # magnitudes 1..10
    out = run_method("breadcrumbs", torch.zeros(10), [tau], model_params=[{"density": 0.5, "gamma": 0.1}])
    # drop the int(0.1*10)=1 largest (10), keep the next int(0.5*10)=5: 5..9
    assert torch.equal(out, torch.where((tau >= 5) & (tau <= 9), tau, 0.0))


def test_breadcrumbs_tensor_shrinks_outlier_cut_but_rows_keep_it():
    tau = torch.arange(1.0, 11.0)
    params = [{"density": 0.8, "gamma": 0.3}]
    tensor = run_method("breadcrumbs", torch.zeros(10), [tau], model_params=params)
    assert torch.equal(tensor, torch.where(tau <= 8, tau, 0.0))  # mergekit: target density wins
    rows = run_method("breadcrumbs", torch.zeros(10), [tau], {"granularity": "row"}, params)
    assert torch.equal(rows, torch.where(tau <= 7, tau, 0.0))  # official: top 3 removed regardless


def test_breadcrumbs_rows_are_independent():
    tau = torch.stack([torch.arange(1.0, 11.0), -torch.arange(10.0, 0.0, -1)])
    out = run_method("breadcrumbs", torch.zeros(2, 10), [tau], {"granularity": "row"}, [{"density": 0.3, "gamma": 0.2}])
    keep = tau.abs().ge(6) & tau.abs().le(8)  # per row: drop 2 largest (9, 10), keep next 3
    assert torch.equal(out, torch.where(keep, tau, 0.0))


def test_breadcrumbs_ties_combines_band_and_consensus():
    base = torch.zeros(4)
    tau1, tau2 = T(1, -2, 3, -4), T(-1, 2, 3, 4)
    out = run_method("breadcrumbs_ties", base, [tau1, tau2], model_params=[{"density": 0.5, "gamma": 0.25}] * 2)
    # each keeps ascending ranks 2..3 (|2|, |3|): tau1 -> (0,-2,3,0), tau2 -> (0,2,3,0)
    # sums (0, 0, 6, 0) -> signs (+,+,+,+); agreeing entries summed (normalize false): (0, 2, 6, 0)
    assert torch.equal(out, T(0, 2, 6, 0))


# ------------------------------------------------------------------ SLERP
def test_slerp_orthogonal_vectors_by_hand():
    out = run_method("slerp", T(1, 0), [T(0, 1)], {"t": 0.5})
    assert torch.allclose(out, T(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-6)
    third = run_method("slerp", T(2, 0), [T(0, 2)], {"t": 1 / 3})
    assert torch.allclose(third, 2 * T(math.cos(math.pi / 6), math.sin(math.pi / 6)), atol=1e-6)


def test_slerp_endpoints_and_colinear_fallback():
    v0, v1 = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.allclose(run_method("slerp", v0, [v1], {"t": 0.0}), v0, atol=1e-6)
    assert torch.allclose(run_method("slerp", v0, [v1], {"t": 1.0}), v1, atol=1e-6)
    assert torch.allclose(run_method("slerp", v0, [3 * v0], {"t": 0.25}), 0.75 * v0 + 0.75 * v0, atol=1e-6)
    assert torch.allclose(run_method("slerp", v0, [-v0], {"t": 0.25}), 0.5 * v0, atol=1e-6)  # antipodal -> lerp


# ------------------------------------------------------------------ Model Stock
def test_model_stock_by_hand():
    base = torch.zeros(2)
    # orthogonal updates: cos = 0 -> t = 0 -> base
    assert torch.equal(run_method("model_stock", base, [T(1, 0), T(0, 1)]), base)
    # parallel updates: cos = 1 -> t = 2/(1+1) = 1 -> the average
    assert torch.allclose(run_method("model_stock", base, [T(1, 1), T(2, 2)]), T(1.5, 1.5))
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert torch.allclose(run_method("model_stock", base, [T(1, 0), T(1, 1)]), t * T(1, 0.5), atol=1e-6)


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    models = [torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])]
    out = run_method("model_stock", base, models, {"filter_wise": True})
    assert torch.allclose(out[0], torch.zeros(2))  # row 0: orthogonal -> base
    assert torch.allclose(out[1], T(1.5, 1.5))  # row 1: parallel -> average
