"""Fisher and RegMean merge formulas on small tensors, against hand computation and torch.linalg."""

from __future__ import annotations

import pytest
import torch

from methods_util import run_method

FISHER_PARAMS = {"fisher": "unused.safetensors"}


def test_fisher_merge_by_hand():
    t1, t2 = [1.0, 2.0, 3.0], [3.0, 6.0, -1.0]
    f1, f2 = [1.0, 0.0, 2.0], [3.0, 1.0, 2.0]
    out = run_method("fisher", None, [t1, t2], {"normalize": False},
                     [{**FISHER_PARAMS, "weight": 1.0}, {**FISHER_PARAMS, "weight": 1.0}], side={"fisher": [f1, f2]})
    # (1*1 + 3*3)/4 = 2.5; entry 2: F1 = 0 -> floor 1e-6: (1e-6*2 + 1*6)/(1 + 1e-6); (2*3 + 2*-1)/4 = 1
    expected = torch.tensor([2.5, (1e-6 * 2 + 6) / (1 + 1e-6), 1.0])
    torch.testing.assert_close(out, expected)


def test_fisher_merge_weights_and_normalisation():
    t1, t2 = [1.0, 5.0], [3.0, -1.0]
    f1, f2 = [4.0, 0.0], [1.0, 1.0]
    norms = [2.0, 0.5]  # ||F|| over the whole file, as stats_passes reads it
    out = run_method("fisher", None, [t1, t2], {"normalize": True, "floor": 0.01},
                     [{**FISHER_PARAMS, "weight": 1.0}, {**FISHER_PARAMS, "weight": 3.0}],
                     side={"fisher": [f1, f2]}, stats={"fisher_norms": norms})
    a1 = [max(4 / 2, 0.01), max(0 / 2, 0.01)]
    a2 = [max(1 / 0.5, 0.01), max(1 / 0.5, 0.01)]
    expected = [(1 * a1[i] * t1[i] + 3 * a2[i] * t2[i]) / (1 * a1[i] + 3 * a2[i]) for i in range(2)]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_fisher_merge_without_fisher_is_the_weighted_average():
    out = run_method("fisher", None, [[1.0, 2.0], [4.0, 8.0]], {},
                     [{**FISHER_PARAMS, "weight": 1.0}, {**FISHER_PARAMS, "weight": 2.0}], side={"fisher": [None, [1.0, 1.0]]})
    torch.testing.assert_close(out, torch.tensor([3.0, 6.0]))


def test_fisher_merge_equal_fishers_is_the_average_property():
    gen = torch.Generator().manual_seed(0)
    a, b, f = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen), torch.rand(4, 3, generator=gen) + 0.1
    out = run_method("fisher", None, [a, b], {"normalize": False}, [FISHER_PARAMS, FISHER_PARAMS], side={"fisher": [f, f]})
    torch.testing.assert_close(out, (a + b) / 2)


def _psd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(3 * n, n, generator=gen, dtype=torch.float64)
    return (x.T @ x / (3 * n)).float()


def _regmean(models, grams, alpha, weights=None):
    weights = weights or [1.0] * len(models)
    return run_method("regmean", None, models, {"alpha": alpha}, [{"gram": "g.safetensors", "weight": w} for w in weights],
                      side={"gram": grams})


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.5])
def test_regmean_matches_the_closed_form(alpha):
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(3, 4, generator=gen) for _ in range(3)]  # out x in, as HF stores Linear weights
    gs = [_psd(4, gen) for _ in range(3)]
    coeffs = [1.0, 2.0, 0.5]
    out = _regmean(ws, gs, alpha, coeffs)
    scaled = [c * (alpha * g.double() + (1 - alpha) * torch.diag(torch.diagonal(g.double()))) for g, c in zip(gs, coeffs)]
    wt = torch.linalg.solve(sum(scaled), sum(s @ w.double().T for s, w in zip(scaled, ws)))  # W*^T = (sum G)^-1 sum G W^T
    torch.testing.assert_close(out, wt.T.float(), rtol=1e-5, atol=1e-5)


def test_regmean_of_one_model_returns_it():
    gen = torch.Generator().manual_seed(2)
    w, g = torch.randn(5, 4, generator=gen), _psd(4, gen)
    torch.testing.assert_close(_regmean([w], [g], 0.9), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.3])
def test_regmean_with_identical_grams_is_the_average(alpha):
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(2, 4, generator=gen) for _ in range(2)]
    g = _psd(4, gen)
    torch.testing.assert_close(_regmean(ws, [g, g], alpha), (ws[0] + ws[1]) / 2, rtol=1e-5, atol=1e-5)


def test_regmean_unused_input_dimension_takes_the_average():
    gen = torch.Generator().manual_seed(4)
    ws = [torch.randn(2, 3, generator=gen) for _ in range(2)]
    gs = [_psd(3, gen) for _ in range(2)]
    for g in gs:  # input 1 is never active in either model's data
        g[1, :] = 0
        g[:, 1] = 0
    out = _regmean(ws, gs, 0.9)
    torch.testing.assert_close(out[:, 1], (ws[0][:, 1] + ws[1][:, 1]) / 2)
    assert torch.isfinite(out).all()


def test_regmean_without_gram_averages():
    out = _regmean([[1.0, 3.0], [3.0, 5.0]], [None, None], 0.9)
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0]))
