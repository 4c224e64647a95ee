"""Intruder dimensions: a planted one is found, a small dense perturbation has none."""

from __future__ import annotations

import pytest
import torch

from deltawise.analyze.intruders import intruder_dimensions, is_analysed_matrix


def planted(seed: int = 0, sigma_factor: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(64, 32, generator=gen)
    u0, s0, _ = torch.linalg.svd(w0.double(), full_matrices=False)
    u = torch.randn(64, generator=gen, dtype=torch.float64)
    u -= u0 @ (u0.T @ u)  # orthogonal to every left singular vector of W0
    u /= u.norm()
    v = torch.randn(32, generator=gen, dtype=torch.float64)
    v /= v.norm()
    w_ft = (w0.double() + sigma_factor * s0[0] * torch.outer(u, v)).float()
    return w0, w_ft, u


def test_planted_intruder_is_found():
    w0, w_ft, u = planted()
    r = intruder_dimensions(w0, w_ft, k=10, eps=0.5)
    assert r.count == 1
    assert r.similarities[0] < 0.2  # the top singular vector is (nearly) the planted one
    assert min(r.similarities[1:]) > 0.5
    assert len(r.singular_values) == 10 and r.singular_values[0] > r.base_singular_values[0]


def test_small_dense_perturbation_has_no_intruders():
    w0, _, _ = planted()
    noise = 1e-3 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(1))
    r = intruder_dimensions(w0, w0 + noise, k=10, eps=0.5)
    assert r.count == 0
    assert min(r.similarities) > 0.9


def test_threshold_and_k_are_configurable():
    w0, w_ft, _ = planted()
    assert intruder_dimensions(w0, w_ft, k=10, eps=1.0).count == 10  # every |cos| < 1 at eps = 1 (up to rounding)
    assert len(intruder_dimensions(w0, w_ft, k=3).similarities) == 3
    # u lies in the column space, so on the right side the planted direction v is not orthogonal to W0's rows
    assert intruder_dimensions(w0, w_ft, side="right").count <= 1
    with pytest.raises(ValueError):
        intruder_dimensions(w0, w_ft[:10])


def test_scope_excludes_embeddings():
    assert is_analysed_matrix("model.layers.0.self_attn.q_proj.weight", (32, 32))
    assert not is_analysed_matrix("model.embed_tokens.weight", (128, 32))
    assert not is_analysed_matrix("lm_head.weight", (128, 32))
    assert not is_analysed_matrix("model.norm.weight", (32,))


# --- the fast path (Gram eigendecompositions) against the exact float64 SVDs -----------------------------------------


def planted_many(m: int, n: int, intruders: int, seed: int, strength: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 of shape m x n plus ``intruders`` rank-one directions orthogonal to W0's column space (when m > n) or random
    (when m <= n, where W0's left vectors span everything), each stronger than W0's top singular value."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    u0, s0, _ = torch.linalg.svd(w0, full_matrices=False)
    w_ft = w0.clone()
    for i in range(intruders):
        u = torch.randn(m, generator=gen, dtype=torch.float64)
        if m > n:
            u -= u0 @ (u0.T @ u)
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        w_ft += (strength + i) * s0[0] * torch.outer(u / u.norm(), v / v.norm())
    return w0.float(), w_ft.float()


def assert_same(fast, exact, sim_tol: float = 1e-6):
    assert fast.count == exact.count
    assert len(fast.similarities) == len(exact.similarities)
    assert fast.similarities == pytest.approx(exact.similarities, abs=sim_tol)
    assert fast.singular_values == pytest.approx(exact.singular_values, rel=1e-9)
    assert fast.base_singular_values == pytest.approx(exact.base_singular_values, rel=1e-9)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (96, 16), (16, 96)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fast_path_equals_exact_svd(shape, side):
    w0, w_ft = planted_many(*shape, intruders=2, seed=sum(shape))
    fast = intruder_dimensions(w0, w_ft, k=6, eps=0.5, side=side, method="fast")
    exact = intruder_dimensions(w0, w_ft, k=6, eps=0.5, side=side, method="exact")
    assert_same(fast, exact)


def test_fast_path_finds_the_planted_intruders():
    w0, w_ft = planted_many(80, 20, intruders=3, seed=3)
    r = intruder_dimensions(w0, w_ft, k=5, eps=0.5, method="fast")
    assert r.count == 3 and max(r.similarities[:3]) < 0.2 and min(r.similarities[3:]) > 0.5


def test_fast_path_with_k_beyond_the_smaller_dimension():
    w0, w_ft = planted_many(40, 6, intruders=1, seed=5)
    for side in ("left", "right"):
        fast = intruder_dimensions(w0, w_ft, k=50, side=side, method="fast")
        exact = intruder_dimensions(w0, w_ft, k=50, side=side, method="exact")
        assert len(fast.similarities) == len(fast.singular_values) == 6  # k is capped at min(m, n)
        assert_same(fast, exact)


def test_fast_path_on_a_rank_deficient_fine_tune_falls_back_to_the_svd():
    # W_ft of rank 3 with k = 5: its 4th and 5th left vectors (m > n) would be W v / 0; the fast path must not divide
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(30, 10, generator=gen)
    w_ft = torch.randn(30, 3, generator=gen) @ torch.randn(3, 10, generator=gen)
    fast = intruder_dimensions(w0, w_ft, k=5, method="fast")
    exact = intruder_dimensions(w0, w_ft, k=5, method="exact")
    assert all(0 <= c <= 1 + 1e-9 for c in fast.similarities)
    assert fast.similarities[:3] == pytest.approx(exact.similarities[:3], abs=1e-6)
    assert fast.singular_values == pytest.approx(exact.singular_values, rel=1e-6, abs=1e-9)


def test_fast_path_on_a_rank_deficient_base():
    # the base's null directions are part of its basis when the requested side is the smaller one (left, m <= n),
    # and fall back to the SVD when they would need W v / s with s = 0 (left, m > n)
    gen = torch.Generator().manual_seed(11)
    for m, n in ((12, 30), (30, 12)):
        w0 = torch.randn(m, 4, generator=gen) @ torch.randn(4, n, generator=gen)
        w_ft = w0 + 0.01 * torch.randn(m, n, generator=gen)
        fast = intruder_dimensions(w0, w_ft, k=3, method="fast")
        exact = intruder_dimensions(w0, w_ft, k=3, method="exact")
        assert_same(fast, exact)


def test_fast_path_with_tied_singular_values():
    # W0 with a repeated singular value: its vectors inside the tie are defined only up to a rotation of that plane, so
    # compare where the answer does not depend on it: fine-tune directions along W0's vectors of distinct values, or
    # orthogonal to the tied plane
    gen = torch.Generator().manual_seed(13)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    p, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 3.0] + [2.5 - 0.1 * i for i in range(17)], dtype=torch.float64)
    w0 = (q * s) @ p.T
    w_ft = w0 + 6.0 * torch.outer(q[:, 12], p[:, 12]) + 4.0 * torch.outer(q[:, 0], p[:, 0])
    for side in ("left", "right"):
        fast = intruder_dimensions(w0.float(), w_ft.float(), k=2, side=side, method="fast")
        exact = intruder_dimensions(w0.float(), w_ft.float(), k=2, side=side, method="exact")
        assert_same(fast, exact)
        assert fast.count == 0 and min(fast.similarities) > 0.99  # both top directions are W0's own


def test_unknown_method_is_refused():
    w0, w_ft = planted_many(8, 4, intruders=0, seed=1)
    with pytest.raises(ValueError, match="method"):
        intruder_dimensions(w0, w_ft, method="randomized")
