"""The fused kernels of the sparsifying merges (TIES, DARE, Breadcrumbs): the torch path's bits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deltawise.merge import base as base_module
from deltawise.merge import fused_sparse, merge
from deltawise.merge.base import TensorJob
from fused_util import (DTYPES, MODEL_PARAMS, SIZES, assert_kernels_change_nothing, assert_same_bits, bits, fused_family,
                        fused_run, method_params, quantised_inputs, raw_chunk, torch_job)

if not fused_sparse.available():
    pytest.skip("deltawise._fused is not built (no C compiler at install time)", allow_module_level=True)


# ---- the sparse merge against the torch path -------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtypes,base_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("tie_rule", ["mergekit", "index", "all"])
def test_ties_kernel_matches_the_torch_path_bit_for_bit(n, dtypes, base_dtype, out_dtype, tie_rule):
    base, models = quantised_inputs(n, dtypes, base_dtype, seed=n)
    method, params = method_params("ties", tie_rule=tie_rule, **{"lambda": 0.9})
    model_params = MODEL_PARAMS[: len(models)]
    job = torch_job(method, base, models, params, model_params)
    ours, stats = fused_run(method, base, models, params, model_params, out_dtype)
    # the raw-chunk passes find the same thresholds and tied entries as the torch passes
    assert stats["thresholds"] == job.stats["thresholds"]
    for a, b in zip(stats["tie_keep"], job.stats["tie_keep"]):
        assert (a is None and b is None) or torch.equal(a, b)
    expected = method.merge(job).to(out_dtype)
    assert torch.equal(bits(ours), bits(expected))


def test_ties_tie_lists_are_exercised_and_normalize_off():
    """On quantised task vectors the k-th magnitude is tied: the kept ties come from the tie rule."""
    base, models = quantised_inputs(4099, (torch.bfloat16,) * 3, torch.bfloat16, seed=1)
    method, params = method_params("ties", normalize=False)
    ours, stats = fused_run(method, base, models, params, MODEL_PARAMS, torch.bfloat16)
    assert all(t is not None and t.numel() > 0 for t in stats["tie_keep"])
    expected = method.merge(torch_job(method, base, models, params, MODEL_PARAMS)).to(torch.bfloat16)
    assert torch.equal(bits(ours), bits(expected))


def test_hand_computed_ties_merge():
    """Two models, density 0.5 (k = 2 of 4), weights 1 and 3, normalize on, as the paper's formula."""
    base = torch.zeros(4)
    models = [torch.tensor([0.5, -0.25, 1.0, 0.125]), torch.tensor([-1.0, 0.75, 0.0625, 0.5])]
    method, params = method_params("ties")
    model_params = [{"weight": 1.0, "density": 0.5}, {"weight": 3.0, "density": 0.5}]
    ours, _ = fused_run(method, base, models, params, model_params, torch.float32)
    # trimmed: [0.5, 0, 1, 0] and [-1, 0.75, 0, 0]; weighted sums: 0.5 - 3 < 0, +2.25, +1, 0 (elects +)
    # entry 0: only model 2 agrees -> -3/3; entry 1: 2.25/3; entry 2: 1/1; entry 3: nothing agrees -> 0
    assert torch.equal(ours, torch.tensor([-1.0, 0.75, 1.0, 0.0]))


@pytest.mark.parametrize("n", [7, 4099])
@pytest.mark.parametrize("dtypes,base_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("method_name,extra", [
    ("breadcrumbs", {}), ("breadcrumbs_ties", {"normalize": True}), ("breadcrumbs", {"tie_rule": "index"}),
    ("breadcrumbs", {"tie_rule": "all", "lambda": 0.5}),
])
def test_breadcrumbs_kernel_matches_the_torch_path(n, dtypes, base_dtype, out_dtype, method_name, extra):
    base, models = quantised_inputs(n, dtypes, base_dtype, seed=n + 1)
    method, params = method_params(method_name, **extra)
    model_params = [dict(p, gamma=0.05) for p in MODEL_PARAMS[: len(models)]]
    expected = method.merge(torch_job(method, base, models, params, model_params)).to(out_dtype)
    ours, _ = fused_run(method, base, models, params, model_params, out_dtype)
    assert torch.equal(bits(ours), bits(expected))


@pytest.mark.parametrize("n", [1, 513, 4099])
@pytest.mark.parametrize("dtypes,base_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("method_name,extra", [
    ("dare_ties", {}), ("dare_linear", {}), ("dare_linear", {"normalize": True, "lambda": 1.5}),
    ("dare_ties", {"rescale_mode": "inverse_density"}), ("dare_ties", {"rescale": False, "normalize": True}),
])
def test_dare_kernel_matches_the_torch_path(n, dtypes, base_dtype, out_dtype, method_name, extra):
    base, models = quantised_inputs(n, dtypes, base_dtype, seed=n + 2)
    method, params = method_params(method_name, **extra)
    model_params = MODEL_PARAMS[: len(models)]
    job = torch_job(method, base, models, params, model_params, seed=5)
    ours, stats = fused_run(method, base, models, params, model_params, out_dtype, seed=5)
    if "scales" in job.stats:  # float64 sums in another order: equal to float32 precision, and here exactly
        assert stats["scales"] == pytest.approx(job.stats["scales"], rel=1e-12)
        assert [float(torch.tensor(s, dtype=torch.float32)) for s in stats["scales"]] == [
            float(torch.tensor(s, dtype=torch.float32)) for s in job.stats["scales"]]
    assert torch.equal(bits(ours), bits(method.merge(job).to(out_dtype)))


# ---- DARE's keep masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,row_start", [((5,), 0), ((), 0), ((40, 30), 0), ((17, 30), 23), ((3, 1000), 2)])
def test_keep_mask_is_the_torch_draw(shape, row_start, monkeypatch):
    """The same numbers as TensorJob.uniform, across RNG blocks (made small here) and chunk offsets."""
    monkeypatch.setattr(base_module, "RNG_BLOCK_ELEMENTS", 256)
    monkeypatch.setattr(fused_sparse, "RNG_BLOCK_ELEMENTS", 256)
    x = torch.zeros(shape)
    job = TensorJob("layers.0.w", x, [x], {}, [{}], {}, seed=11, row_start=row_start)
    for density in (0.1, 0.5, 0.9):
        out = torch.empty(max(1, x.numel()), dtype=torch.uint8)[: x.numel()]
        mask = fused_sparse.keep_mask(out, 11, "layers.0.w", 0, shape, row_start, density)
        assert torch.equal(mask.bool(), (job.uniform(0) < density).reshape(-1))


def test_keep_masks_keep_the_drop_rate_and_ignore_threads_and_chunking():
    rows, cols, density = 600, 1000, 0.3
    whole = torch.empty(rows * cols, dtype=torch.uint8)
    fused_sparse.keep_mask(whole, 3, "w", 1, (rows, cols), 0, density)
    n = whole.numel()
    kept = int(whole.sum())
    sd = (n * density * (1 - density)) ** 0.5
    assert abs(kept - n * density) < 5 * sd  # Bernoulli(density) per entry
    assert whole.max() == 1

    def chunk(bounds):
        a, b = bounds
        out = torch.empty((b - a) * cols, dtype=torch.uint8)
        return fused_sparse.keep_mask(out, 3, "w", 1, (b - a, cols), a, density)

    for threads, step in ((1, 600), (2, 7), (4, 113)):
        bounds = [(a, min(a + step, rows)) for a in range(0, rows, step)]
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(chunk, bounds))
        assert torch.equal(torch.cat(parts), whole)


# ---- the tie order ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 16, 17, 100, 5000, 40_000])
@pytest.mark.parametrize("descending", [True, False])
def test_tie_select_is_torch_sorts_order(n, descending):
    """The entries torch.sort (CPU, not stable) places in a window, without sorting the whole tensor."""
    gen = torch.Generator().manual_seed(n)
    for levels in (1, 3, 40):
        magnitudes = torch.randint(0, levels, (n,), generator=gen).float() / 8
        for _ in range(3):
            start = 0 if descending else int(torch.randint(0, n, (1,), generator=gen))
            stop = int(torch.randint(start + 1, n + 1, (1,), generator=gen))
            order = torch.argsort(magnitudes, descending=True) if descending else torch.sort(magnitudes).indices
            inside = order[start:stop]
            bounds = (float(magnitudes[order[start]]), float(magnitudes[order[stop - 1]]))
            expected = inside[torch.isin(magnitudes[inside], torch.tensor(bounds))].sort().values
            got = fused_sparse.tie_select(magnitudes, descending, start, stop, bounds, stop - start)
            assert torch.equal(got, expected)


# ---- through the engine -------------------------------------------------------------------------


@pytest.mark.parametrize("method,params", [
    ("ties", {}), ("ties", {"tie_rule": "index", "normalize": False}), ("ties", {"granularity": "global"}),
    ("dare_ties", {}), ("dare_linear", {"rescale_mode": "inverse_density"}), ("breadcrumbs_ties", {"gamma": 0.05}),
])
def test_engine_output_is_the_same_with_and_without_the_kernels(make_folder, tmp_path, monkeypatch, method, params):
    family = fused_family(make_folder)
    recipe = {"merge_method": method, "base_model": str(family["base"]), "seed": 4,
              "models": [{"model": str(family[m]), "parameters": {"weight": w, "density": d}}
                         for m, w, d in (("ft1", 0.5, 0.3), ("ft2", 0.3, 0.5), ("ft3", 0.9, 0.2))],
              "parameters": params}
    assert_kernels_change_nothing(recipe, tmp_path, monkeypatch)


@pytest.mark.parametrize("method,params", [("ties", {}), ("ties", {"tie_rule": "index"}), ("breadcrumbs", {"gamma": 0.05})])
def test_large_tensors_read_again_instead_of_keeping_magnitudes(make_folder, tmp_path, monkeypatch, method, params):
    """Above thresholds.KEEP_BYTES the radix and tie passes read the inputs again: the same bits."""
    from deltawise.merge import engine, thresholds

    family = fused_family(make_folder)
    recipe = {"merge_method": method, "base_model": str(family["base"]),
              "models": [{"model": str(family[m]), "parameters": {"weight": 1.0, "density": 0.3}} for m in ("ft1", "ft2")],
              "parameters": params}
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    merge(recipe, str(tmp_path / "kept"), threads=2)
    monkeypatch.setattr(thresholds, "KEEP_BYTES", 0)
    merge(recipe, str(tmp_path / "reread"), threads=2)
    assert_same_bits(tmp_path / "kept", tmp_path / "reread")
