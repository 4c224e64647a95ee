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
