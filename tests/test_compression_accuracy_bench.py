"""benchmarks/compression_accuracy.py: each compression rebuilds the task vector its definition says, and counts
the bytes its stored form takes (the benchmark's compression factor is dense bytes / these)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compression_accuracy import compressions  # noqa: E402


@pytest.fixture()
def builds() -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(0)
    tau = {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}
    mtl = {k: 2 * v + 0.5 * torch.randn(v.shape, generator=g) for k, v in tau.items()}
    table = {(m, s): (values, build) for m, s, values, build in compressions(tau, mtl, 4, quick=False)}
    return tau, mtl, table


def top(v: torch.Tensor, density: float) -> torch.Tensor:
    """The TIES code's rule (deltawise.delta.compress.topk_mask): drop the d - int(d * density) smallest
    magnitudes, keep every entry at or above the largest dropped one (so one more than int(d * density))."""
    n_drop = v.numel() - int(v.numel() * density)
    threshold = v.abs().reshape(-1).sort().values[n_drop - 1]
    return v.abs() >= threshold


def test_topk_keeps_the_largest_entries_exactly(builds):
    tau, _, table = builds
    out, size = table[("topk", "density 0.2")][1](None)
    for k, v in tau.items():
        assert torch.equal(out[k], torch.where(top(v, 0.2), v, 0.0))
    dense = sum(v.numel() * 4 for v in tau.values())
    assert 0 < size < dense


def test_compeft_replaces_kept_entries_by_sign_times_alpha_sigma(builds):
    tau, _, table = builds
    values, build = table[("compeft", "density 0.1")]
    assert len(values) > 1  # alpha is tuned
    out, size = build(2.0)
    for k, v in tau.items():
        sigma = float(v.double().std(unbiased=False))
        want = torch.where(top(v, 0.1), v.sign() * 2.0 * sigma, 0.0)
        assert torch.allclose(out[k], want.to(out[k].dtype), rtol=1e-6, atol=0)
    _, topk_size = table[("topk", "density 0.1")][1](None)
    assert size < topk_size  # a sign per kept entry stores less than its value


def test_lowrank_is_the_truncated_svd_and_counts_both_factors(builds):
    tau, _, table = builds
    out, size = table[("lowrank", "rank 4")][1](None)
    U, S, Vh = torch.linalg.svd(tau["w"], full_matrices=False)
    assert torch.allclose(out["w"], (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5)
    assert torch.equal(out["b"], tau["b"])  # 1-D tensors stay dense
    assert size == 4 * (16 + 8) * 4 + 8 * 4


def test_tall_mask_selects_the_multitask_vector_where_the_task_dominates(builds):
    tau, mtl, table = builds
    out, size = table[("tall", "λ_t tuned")][1](0.4)
    for k, v in tau.items():
        mask = v.abs() > 0.4 * (mtl[k] - v).abs()
        assert torch.equal(out[k], torch.where(mask, mtl[k], 0.0))
    # a quarter of the shared float32 vector (4 tasks) plus one bit per entry
    assert size == int(sum(v.numel() * 4 / 4 + (v.numel() + 7) // 8 for v in tau.values()))


def test_entries_that_did_not_move_are_not_stored(builds):
    tau, mtl, _ = builds
    still = {**tau, "e": torch.cat([torch.zeros(95), torch.linspace(1, 5, 5)])}  # 95% exactly zero, as untouched rows
    table = {(m, s): build for m, s, _, build in compressions(still, {**mtl, "e": still["e"]}, 4, quick=False)}
    out, size = table[("topk", "density 0.2")](None)
    assert torch.equal(out["e"], still["e"])  # the 5 moved entries, nothing else
    _, without = {(m, s): b for m, s, _, b in compressions(tau, mtl, 4, quick=False)}[("topk", "density 0.2")](None)
    assert size - without == (100 + 7) // 8 + 5 * 4  # the mask's bits and five float32 values


def test_compeft_alphas_share_one_mask_and_scale_linearly(builds):
    tau, _, table = builds
    build = table[("compeft", "density 0.2")][1]
    one, size_one = build(1.0)
    three, size_three = build(3.0)
    assert size_one == size_three
    for k in tau:
        assert torch.allclose(three[k], 3 * one[k], rtol=1e-6)
