"""The fused kernels of the sparsifying merges (TIES, DARE, Breadcrumbs): the torch path's bits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import load_state

from deltawise.merge import base as base_module
from deltawise.merge import fused_sparse, merge, sparsify
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


@pytest.mark.parametrize("lower,upper", [(0.25, 0.75), (0.25, None), (None, 0.75), (None, None)])
def test_window_trim_with_listed_entries_across_blocks(lower, upper):
    """The magnitude window with exclusive bounds (either may be absent) and the listed entries kept besides, in the
    first, last and edge entries of the kernel's 512-entry blocks, in a chunk that starts inside the tensor;
    non-finite differences are trimmed as the comparisons say (and counted)."""
    n, offset = 1537, 700
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(-4, 4, (n,), generator=gen).float()
    # differences exact in float32, a fifth of them +-0.25 or +-0.75: on a bound, trimmed
    d = torch.randint(-64, 65, (n,), generator=gen).float() / 64
    on_bound = torch.rand(n, generator=gen) < 0.2
    d[on_bound] = torch.tensor([0.25, -0.25, 0.75, -0.75])[torch.randint(0, 4, (int(on_bound.sum()),), generator=gen)]
    x = base + d
    x[[3, 600, 1536]] = torch.tensor([float("inf"), float("nan"), -float("inf")])
    listed = torch.tensor([0, 1, 511, 512, 513, 1023, 1024, 1535, 1536, 600], dtype=torch.int64)
    listed = (listed.unique() + offset).contiguous()  # flat indices within the tensor, ascending
    out = torch.empty(n)
    trims = [(1.0, fused_sparse.WINDOW, lower, upper, listed.numpy(), None, fused_sparse.NO_RESCALE, 1.0)]
    bad = fused_sparse._kernels.sparse_merge(fused_sparse._raw(out), 0, fused_sparse._raw(base), 0, [fused_sparse._raw(x)],
                                             [0], trims, False, False, False, None, None, offset, None)
    expected = base + sparsify.trim_listed(x - base, lower, upper, listed, offset)  # the torch path's trim
    assert torch.equal(bits(out), bits(expected))
    assert bad >= 3  # the non-finite differences, and what they make of the output


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


def _torch_window_ties(magnitudes, descending, start, stop):
    order = torch.argsort(magnitudes, descending=True) if descending else torch.sort(magnitudes).indices
    inside = order[start:stop]
    bounds = (float(magnitudes[order[start]]), float(magnitudes[order[stop - 1]]))
    return bounds, inside[torch.isin(magnitudes[inside], torch.tensor(bounds))].sort().values


def _dense(n, gen, around):
    """Magnitudes whose float32 bit patterns are nearly every integer next to ``around``'s: no free keys beside the
    boundary values, so the keys made for tied entries must move the others out of the way."""
    bits = torch.tensor(around, dtype=torch.float32).view(torch.int32) + torch.randint(-5, 6, (n,), generator=gen,
                                                                                       dtype=torch.int32)
    return bits.clamp_(min=0).view(torch.float32)


@pytest.mark.parametrize("n", [300, 5000])
@pytest.mark.parametrize("around", [1e-3, 3.0e38, 1e-44])  # ordinary, next to the largest float, subnormal
@pytest.mark.parametrize("descending", [True, False])
def test_tie_select_with_dense_bit_patterns(n, around, descending):
    """Tied values whose neighbouring bit patterns are all taken (float32 inputs), near the largest float (the
    shifted keys must not overflow) and among subnormals and zeros: torch.sort's order all the same, in place too."""
    gen = torch.Generator().manual_seed(n)
    magnitudes = _dense(n, gen, around)
    magnitudes[torch.randint(0, n, (n // 10,), generator=gen)] = 0.0
    for _ in range(4):
        start = 0 if descending else int(torch.randint(0, n, (1,), generator=gen))
        stop = int(torch.randint(start + 1, n + 1, (1,), generator=gen))
        bounds, expected = _torch_window_ties(magnitudes, descending, start, stop)
        assert torch.equal(fused_sparse.tie_select(magnitudes, descending, start, stop, bounds, stop - start), expected)
        scratch = magnitudes.clone()
        got = fused_sparse.tie_select(scratch, descending, start, stop, bounds, stop - start, overwrite=True)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("descending", [True, False])
def test_tie_select_keeps_exactly_the_window(descending):
    """Property, whatever the sort's order among equals: the window holds every entry strictly between its
    boundary values, so the tied entries kept number (stop - start) minus those, all at a boundary value."""
    gen = torch.Generator().manual_seed(7)
    for trial in range(20):
        n = int(torch.randint(2, 3000, (1,), generator=gen))
        magnitudes = torch.randint(0, int(torch.randint(1, 50, (1,), generator=gen)), (n,), generator=gen).float() / 64
        start = 0 if descending else int(torch.randint(0, n, (1,), generator=gen))
        stop = int(torch.randint(start + 1, n + 1, (1,), generator=gen))
        ordered = magnitudes.sort(descending=descending).values
        bounds = (float(ordered[start]), float(ordered[stop - 1]))
        got = fused_sparse.tie_select(magnitudes, descending, start, stop, bounds, stop - start)
        lo, hi = min(bounds), max(bounds)
        strictly = int(((magnitudes > lo) & (magnitudes < hi)).sum())
        assert got.numel() == stop - start - strictly
        assert torch.isin(magnitudes[got], torch.tensor(bounds)).all()
        assert torch.equal(got, got.unique())  # ascending, no repeats


def test_tie_select_refuses_negative_or_nonfinite_magnitudes():
    for bad in (-1.0, float("inf"), float("nan"), -0.0):
        for n, at in ((4, 1), (40, 3), (40, 33)):  # the keys are made 16 at a time, then one by one
            magnitudes = torch.full((n,), 0.25)
            magnitudes[::3] = 0.5
            magnitudes[at] = bad
            for boundaries in ((0.5,), (0.25, 0.5)):
                with pytest.raises(ValueError, match="finite and non-negative"):
                    fused_sparse.tie_select(magnitudes, True, 0, 2, boundaries, n)


@pytest.mark.parametrize("n", [15, 16, 17, 31, 32, 33, 47, 48, 1000, 1024])
@pytest.mark.parametrize("descending", [True, False])
def test_tie_select_with_ties_at_the_edges_of_the_16_key_steps(n, descending):
    """The keys are made 16 at a time, the last n % 16 one by one: tied entries first, last and on either side of
    each step's edge, at one boundary value or two, the lower one zero or not: torch.sort's order all the same."""
    gen = torch.Generator().manual_seed(n)
    for low in (0.0, 0.125):
        magnitudes = torch.rand(n, generator=gen) + 1.0  # distinct, apart from the tied values below
        edges = [i for i in range(n) if i % 16 in (0, 15)] + [n - 1]
        for j, i in enumerate(edges):
            magnitudes[i] = (low, 0.5, 4.0)[j % 3]
        for _ in range(4):
            start = 0 if descending else int(torch.randint(0, n, (1,), generator=gen))
            stop = int(torch.randint(start + 1, n + 1, (1,), generator=gen))
            bounds, expected = _torch_window_ties(magnitudes, descending, start, stop)
            got = fused_sparse.tie_select(magnitudes, descending, start, stop, bounds, stop - start)
            assert torch.equal(got, expected)
        for bounds in ((low,), (0.5,), (4.0,), (low, 0.5), (0.5, 4.0)):  # whole windows: every tie of the values
            within = torch.isin(magnitudes, torch.tensor(bounds)).nonzero().squeeze(1)
            got = fused_sparse.tie_select(magnitudes, descending, 0, n, bounds, n)
            assert torch.equal(got, within), bounds


def test_magnitude_bins_count_two_bins_in_one_read():
    """The low radix pass over kept magnitudes: the lower 16 bits of the entries in each wanted upper bin."""
    gen = torch.Generator().manual_seed(3)
    magnitudes = (torch.randn(50_000, generator=gen) * 1e-3).abs().bfloat16().float() + torch.rand(50_000, generator=gen) * 1e-9
    bits = magnitudes.view(torch.int32)
    highs = (bits >> 16).unique()
    wanted = [int(h) for h in highs[torch.randperm(highs.numel(), generator=gen)[:3]]]
    counters = {h: torch.zeros(65536, dtype=torch.int64) for h in wanted}
    fused_sparse.histogram_magnitudes(magnitudes, counters)  # three bins: two reads
    for h in wanted:
        expected = torch.bincount(bits[(bits >> 16) == h] & 0xFFFF, minlength=65536)
        assert torch.equal(counters[h], expected), h


def _high(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32)) >> 16


def _made_keys(magnitudes, bounds):
    """A copy of magnitudes that the second radix pass turned into tie keys for ``bounds`` (one in each upper bin),
    its TieKeys, and its counts (checked against the pass without keys)."""
    highs = sorted({_high(b) for b in bounds})
    listed = int(torch.isin(magnitudes.view(torch.int32) >> 16, torch.tensor(highs)).sum())
    made, counters = magnitudes.clone(), {h: torch.zeros(65536, dtype=torch.int64) for h in highs}
    keys = fused_sparse.histogram_magnitudes(made, counters, listed)
    plain = {h: torch.zeros(65536, dtype=torch.int64) for h in highs}
    assert fused_sparse.histogram_magnitudes(magnitudes.clone(), plain) is None
    assert all(torch.equal(counters[h], plain[h]) for h in highs)
    assert keys.highs == tuple(highs) and torch.equal(keys.positions, keys.positions.unique())  # ascending
    return made, keys


def _keys_alone(buffer, bounds, keys=None):
    """The keys tie_select makes (an empty window sorts nothing), as integers."""
    fused_sparse.tie_select(buffer, True, 0, 0, bounds, 1, overwrite=True, keys=keys)
    return buffer.view(torch.int32)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 1000, 1024])
def test_magnitude_bins_make_the_tie_select_keys_of_the_key_pass(n):
    """The second radix pass makes tie_select's keys on its way (tie_select then finishes its bins' entries): the
    very keys of tie_select's own key pass, for one boundary value or two, with tied entries and other entries of the
    boundaries' bins (just above and below a boundary) on both sides of each 8- and 16-entry step and in the tail
    (one by one), zero among the values or not."""
    gen = torch.Generator().manual_seed(n)
    for low in (0.0, 0.125):
        magnitudes = torch.rand(n, generator=gen) + 1.0  # bins of their own, apart from the values below
        edges = [i for i in range(n) if i % 8 in (0, 7)] + [n - 1]
        for j, i in enumerate(edges):
            value = (low, 0.5, 4.0)[j % 3]
            step = (0, 0, 3, -2)[j % 4] if value else (0, 0, 3)[j % 3]  # in the boundary's bin, or tied to it
            magnitudes[i] = (torch.tensor(value).view(torch.int32) + step).view(torch.float32)
        for bounds in ((low,), (0.5,), (4.0,), (low, 0.5), (0.5, 4.0), (4.0, low)):
            made, keys = _made_keys(magnitudes, bounds)
            expected = _keys_alone(magnitudes.clone(), bounds)
            assert torch.equal(_keys_alone(made, bounds, keys), expected), bounds


def _two_bins(n, gen, around):
    """Dense bit patterns (``_dense``) around two values, shuffled, zeros among them."""
    magnitudes = torch.cat([_dense(n // 2, gen, around[0]), _dense(n - n // 2, gen, around[1])])
    magnitudes[torch.randint(0, n, (n // 20,), generator=gen)] = 0.0
    return magnitudes[torch.randperm(n, generator=gen)]


@pytest.mark.parametrize("n", [300, 5000])
@pytest.mark.parametrize("around", [(1e-3, 4e-3), (3.0e38, 7.5e37), (1e-44, 1e-3)])
def test_tie_select_on_keys_made_by_magnitude_bins_is_torch_sorts_order(n, around):
    """Keys made on the way by the second radix pass: torch.sort's order all the same, for TIES' window (descending
    from the top, one boundary value) and Breadcrumbs' band (ascending, two values in two bins), on dense bit
    patterns (no free keys beside a boundary), next to the largest float and among subnormals and zeros."""
    gen = torch.Generator().manual_seed(n)
    magnitudes = _two_bins(n, gen, around)
    ordered = magnitudes.sort().values
    for _ in range(4):
        stop = int(torch.randint(1, n + 1, (1,), generator=gen))  # TIES: the threshold alone is a boundary
        order = torch.argsort(magnitudes, descending=True)
        bound = float(magnitudes[order[stop - 1]])
        inside = order[:stop]
        expected = inside[magnitudes[inside] == bound].sort().values
        made, keys = _made_keys(magnitudes, (bound,))
        assert torch.equal(fused_sparse.tie_select(made, True, 0, stop, (bound,), stop, keys=keys), expected)
        start = int(torch.randint(0, n // 2 - n // 20, (1,), generator=gen))  # Breadcrumbs: a band across both bins
        stop = int(torch.randint(n // 2 + n // 20, n + 1, (1,), generator=gen))
        bounds, expected = _torch_window_ties(magnitudes, False, start, stop)
        if _high(bounds[0]) == _high(bounds[1]):  # zeros and subnormals share bin 0
            assert float(ordered[start]) < 1e-40
            continue
        made, keys = _made_keys(magnitudes, bounds)
        assert torch.equal(fused_sparse.tie_select(made, False, start, stop, bounds, stop - start, keys=keys), expected)


def test_tie_select_and_magnitude_bins_refuse_keys_they_cannot_make():
    """Keys are made for boundaries one in each bin, from finite non-negative magnitudes, into enough positions."""
    magnitudes = torch.tensor([0.5, 0.25, 0.5, 0.75, 0.5000001, 0.25] * 7)
    made, keys = _made_keys(magnitudes, (0.25, 0.5))
    with pytest.raises(ValueError, match="upper bins of other boundaries"):  # 0.75 is in no bin of the keys
        fused_sparse.tie_select(made.clone(), False, 0, 20, (0.5, 0.75), 20, keys=keys)
    with pytest.raises(ValueError, match="upper bins of other boundaries"):  # two values of one bin
        fused_sparse.tie_select(made.clone(), False, 0, 20, (0.5, 0.5000001), 20, keys=keys)
    counts = [torch.zeros(65536, dtype=torch.int64) for _ in range(2)]
    with pytest.raises(ValueError, match="positions holds"):
        fused_sparse._kernels.magnitude_bins(magnitudes.clone().numpy(), [_high(0.25), _high(0.5)],
                                             [c.numpy() for c in counts], torch.empty(3, dtype=torch.int32).numpy())
    with pytest.raises(ValueError, match="ascending"):
        fused_sparse._kernels.magnitude_bins(magnitudes.clone().numpy(), [_high(0.5), _high(0.25)],
                                             [c.numpy() for c in counts], torch.empty(99, dtype=torch.int32).numpy())
    for bad in (-1.0, float("inf"), float("nan")):
        for at in (1, 40):  # 16 a step, then one by one
            broken = magnitudes.clone()
            broken[at] = bad
            with pytest.raises(ValueError, match="finite and non-negative"):
                fused_sparse.histogram_magnitudes(broken, {_high(0.5): torch.zeros(65536, dtype=torch.int64)}, 99)


def test_the_baseline_copy_of_the_tie_kernels_gives_the_same_indices():
    """On x86-64 the AVX2 copy of the tie selection normally runs; CPUs without it take the baseline copy."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if os.environ.get("DELTAWISE_FUSED_NO_SIMD"):
        pytest.skip("this run is the baseline run")
    env = dict(os.environ, DELTAWISE_FUSED_NO_SIMD="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__,
                          "-k", "tie_select or magnitude_bins"], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


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


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("method,params", [("ties", {}), ("breadcrumbs", {"gamma": 0.05})])
def test_whole_tensor_magnitudes_of_16bit_inputs_give_the_same_bits(make_folder, tmp_path, monkeypatch, mixed, method,
                                                                    params):
    """tie_rule mergekit keeps a tensor's magnitudes whole, above thresholds.KEEP_BYTES too, when every input is
    16-bit (mixed: one fine-tune in float32, so it reads again): the same bits as reading again and as torch."""
    from deltawise.merge import engine, thresholds

    family = fused_family(make_folder)
    if mixed:
        family["ft2"] = make_folder("ft2_f32", {k: v.float() for k, v in load_state(family["ft2"]).items()})
    recipe = {"merge_method": method, "base_model": str(family["base"]),
              "models": [{"model": str(family[m]), "parameters": {"weight": 1.0, "density": 0.3}} for m in ("ft1", "ft2")],
              "parameters": params}
    gathered = []
    real_gather = fused_sparse.gather
    monkeypatch.setattr(fused_sparse, "gather", lambda *a, **k: gathered.append(1) or real_gather(*a, **k))
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(thresholds, "KEEP_BYTES", 0)
    merge(recipe, str(tmp_path / "whole"), threads=2)
    assert bool(gathered) == mixed  # the tie pass read the inputs again only where they are not all 16-bit
    monkeypatch.setattr(thresholds, "KEEP_WHOLE_16BIT", False)
    merge(recipe, str(tmp_path / "reread"), threads=2)
    assert gathered
    monkeypatch.setattr(fused_sparse, "available", lambda: False)
    merge(recipe, str(tmp_path / "torch"), threads=2)
    assert_same_bits(tmp_path / "whole", tmp_path / "reread")
    assert_same_bits(tmp_path / "whole", tmp_path / "torch")


@pytest.mark.parametrize("one_bin", [False, True])
@pytest.mark.parametrize("method,params", [("ties", {}), ("breadcrumbs", {"gamma": 0.05})])
def test_tie_keys_of_the_second_radix_pass_give_the_same_bits(make_folder, tmp_path, monkeypatch, one_bin, method, params):
    """tie_rule mergekit: the second radix pass makes the tie order's keys where each boundary value has an upper bin
    of its own (here bfloat16 and float32 fine-tunes mixed); where a band's two boundaries share one (float32
    magnitudes 1 + k * 2**-20, every one in bin 0x3f80), tie_select makes them itself. The torch path's bits."""
    if one_bin:
        gen = torch.Generator().manual_seed(5)
        shapes = {"embed.weight": (300, 16), "layer.weight": (48, 40)}
        family = {"base": make_folder("base", {k: torch.zeros(s) for k, s in shapes.items()})}
        for i in (1, 2, 3):
            signs = {k: torch.randint(0, 2, s, generator=gen) * 2 - 1 for k, s in shapes.items()}
            family[f"ft{i}"] = make_folder(f"ft{i}", {k: (1 + torch.randint(0, 21, s, generator=gen) * 2.0**-20) * signs[k]
                                                      for k, s in shapes.items()})
    else:
        family = fused_family(make_folder)
        family["ft2"] = make_folder("ft2_f32", {k: v.float() for k, v in load_state(family["ft2"]).items()})
    recipe = {"merge_method": method, "base_model": str(family["base"]),
              "models": [{"model": str(family[m]), "parameters": {"weight": 1.0, "density": 0.3}} for m in ("ft1", "ft2", "ft3")],
              "parameters": params}
    made = []
    real = fused_sparse.tie_select
    monkeypatch.setattr(fused_sparse, "tie_select", lambda *a, **k: made.append(k.get("keys") is not None) or real(*a, **k))
    assert_kernels_change_nothing(recipe, tmp_path, monkeypatch)
    assert made and set(made) == {not (one_bin and method == "breadcrumbs")}
