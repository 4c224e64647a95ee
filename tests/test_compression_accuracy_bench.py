"""benchmarks/compression_accuracy.py: each compression rebuilds the task vector its definition says, and counts
the bytes its stored form takes (the benchmark's compression factor is dense bytes / these)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compression_accuracy import compressions, searched, summarise, tune  # noqa: E402


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


def test_scaled_controls_multiply_the_exact_values(builds):
    tau, _, table = builds
    values, build = table[("topk_scaled", "density 0.2")]
    assert len(values) > 1  # alpha is tuned, as ComPEFT's
    exact, size = table[("topk", "density 0.2")][1](None)
    out, scaled_size = build(3.0)
    assert scaled_size == size  # the scale is one number per tensor
    for k in tau:
        assert torch.equal(out[k], 3.0 * exact[k])
    dense, dense_size = table[("scaled", "dense")][1](0.5)
    assert dense_size == sum(v.numel() * 4 for v in tau.values())
    for k, v in tau.items():
        assert torch.equal(dense[k], 0.5 * v)


def test_tune_extends_the_grid_only_while_its_top_wins():
    tried = []

    def peak_at(p):
        def score(v):
            tried.append(v)
            return -abs(v - p)
        return score

    assert tune([1, 2, 3], [4, 6, 9], peak_at(2), {})[0] == 2
    assert tried == [1, 2, 3]  # the top did not win: no extension
    tried.clear()
    choice, scores = tune([1, 2, 3], [4, 6, 9], peak_at(5), {})
    assert (choice, tried) == (4, [1, 2, 3, 4, 6])  # 6 lost to 4: stop there
    tried.clear()
    assert tune([1, 2, 3], [4, 6], peak_at(100), {})[0] == 6  # the extension ran out
    tried.clear()
    flat = tune([1, 2, 3], [4], lambda v: tried.append(v) or 0.5, {})
    assert flat[0] == 1  # ties go to the smaller value, and the top did not win alone


def test_cached_search_resumes_only_where_an_old_choice_sat_on_the_grid_top():
    grid = [0.5, 1.0, 4.0]
    assert searched(None, grid) == {}  # nothing cached: search all
    assert searched({"choice": 1.0}, grid) is None  # inside the old grid: final
    assert searched({"choice": None}, [None]) is None  # untuned rows are final
    assert searched({"choice": 1.0, "searched": {}}, grid) is None  # already searched with the extension
    known = searched({"choice": 4.0}, grid)
    assert known == {0.5: None, 1.0: None}  # below the old choice, never rescored
    tried = []
    choice, scores = tune(grid, [5.0, 6.0], lambda v: tried.append(v) or {4.0: 0.7, 5.0: 0.8, 6.0: 0.75}[v], known)
    assert (choice, tried) == (5.0, [4.0, 5.0, 6.0])


def test_summary_pairs_each_row_with_its_control_by_seed():
    """Accuracy kept is the mean over tasks per seed; ComPEFT's control difference is taken seed by seed against
    top-k × α at the same density (a paired t-interval over seeds), rows come in a fixed order with settings
    sorted by value, and "below" counts the tasks whose item interval lies entirely under 100%."""
    def task(ratio, high=1.1):
        return {"ratio": ratio, "low": ratio - 0.1, "high": high, "compression": 10.0}

    def run(compeft, scaled, low_high):
        return {"rows": {"topk_scaled | density 0.1": {"tasks": {"a": task(scaled), "b": task(scaled)}},
                         "compeft | density 0.1": {"tasks": {"a": task(compeft[0]), "b": task(compeft[1], low_high)}},
                         "compeft | density 0.05": {"tasks": {"a": task(1.0)}}}}

    runs = [run((1.0, 0.8), 0.95, 0.9), run((1.0, 1.0), 0.97, 1.1), run((0.9, 1.0), 0.96, 1.1)]
    summary = summarise(runs)
    assert list(summary) == ["compeft | density 0.05", "compeft | density 0.1", "topk_scaled | density 0.1"]
    row = summary["compeft | density 0.1"]
    assert row["per_seed"] == pytest.approx([0.9, 1.0, 0.95])
    assert row["below"] == [1, 0, 0]
    assert row["worst_low"] == pytest.approx(0.7)
    differences = [0.9 - 0.95, 1.0 - 0.97, 0.95 - 0.96]
    control = row["vs_control"]
    assert control["of"] == "topk_scaled" and control["n"] == 3
    assert control["mean"] == pytest.approx(sum(differences) / 3)
    assert control["low"] < control["mean"] < control["high"]
    assert "vs_control" not in summary["compeft | density 0.05"]  # its control row is missing on every seed
