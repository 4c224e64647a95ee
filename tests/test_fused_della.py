"""DELLA and DELLA-linear on the fused kernels: the torch path's masks and bits (``_fused_della.c``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deltawise.merge import base as base_module
from deltawise.merge import fused_sparse, merge
from deltawise.merge.base import TensorJob
from deltawise.merge.methods.della import keep_probabilities
from deltawise.merge.sparsify import rank_probabilities
from fused_util import (DTYPES, MODEL_PARAMS, assert_same_bits, bits, count_calls, fused_family, fused_run, method_params,
                        quantised_inputs, raw_chunk, torch_job)

if not fused_sparse.available():
    pytest.skip("deltawise._fused is not built (no C compiler at install time)", allow_module_level=True)

DELLA_PARAMS = [dict(p, epsilon=e) for p, e in zip(MODEL_PARAMS, (0.1, 0.15, 0.05))]


def _torch_mask(x: torch.Tensor, base: torch.Tensor, density: float, epsilon: float, seed: int, name: str,
                row_start: int = 0) -> torch.Tensor:
    """The torch path's mask: TensorJob.uniform < della.keep_probabilities (what della.py's ``kept`` uses)."""
    job = TensorJob(name, base.float(), [x.float()], {}, [{}], {}, seed, row_start=row_start)
    delta = x.float() - base.float()
    return (job.uniform(0) < keep_probabilities(delta, density, epsilon)).reshape(-1)


def _kernel_mask(x: torch.Tensor, base: torch.Tensor, density: float, epsilon: float, seed: int, name: str,
                 row_start: int = 0) -> torch.Tensor:
    chunk = raw_chunk(base, [x], seed, name, row_start)
    out = torch.empty(max(1, x.numel()), dtype=torch.uint8)[: x.numel()]
    return fused_sparse.della_mask(out, chunk, 0, density, epsilon)[0].bool()


# ---- the masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,row_start", [
    ((), 0), ((1,), 0), ((5,), 0), ((700,), 0), ((40, 30), 0), ((17, 30), 23), ((3, 1000), 2), ((9, 1), 4),
    ((6, 5, 4), 0), ((4, 33, 3), 7), ((2, 3, 2, 5), 1),
])
@pytest.mark.parametrize("levels", [3, 40, None])
def test_della_mask_is_the_torch_paths(shape, row_start, levels, monkeypatch):
    """Rows of one, of at most 32 (insertion sort) and longer (radix sort), lines along dimension 1 of
    3-d and 4-d tensors, chunks that start mid-tensor and cross RNG blocks (made small here); few
    magnitude levels give many ties within a row, which keep index order as argsort(stable=True)."""
    monkeypatch.setattr(base_module, "RNG_BLOCK_ELEMENTS", 256)
    monkeypatch.setattr(fused_sparse, "RNG_BLOCK_ELEMENTS", 256)
    gen = torch.Generator().manual_seed(len(shape) * 100 + row_start)
    base = torch.randn(shape, generator=gen).bfloat16()
    if levels is None:  # continuous float32 task vectors: no ties, every digit of the radix sort
        x = base.float() + torch.randn(shape, generator=gen) * 0.01
    else:
        x = (base.float() + torch.randint(-levels, levels + 1, shape, generator=gen).float() / 64).bfloat16()
    for density, epsilon in ((0.2, 0.1), (0.5, 0.45), (0.9, 0.05)):
        expected = _torch_mask(x, base, density, epsilon, 11, "layers.0.w", row_start)
        got = _kernel_mask(x, base, density, epsilon, 11, "layers.0.w", row_start)
        assert torch.equal(got, expected)


def _magnitudes(kind: str, rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of task vectors that drive each path of the kernel's rank decision (``line_keep``)."""
    sign = torch.sign(torch.randn(rows, n, generator=gen)).clamp(min=0).mul(2).sub(1)
    if kind == "wide":  # 40 binades: many entries below the bins' range share the bin underneath
        return sign * torch.exp2(torch.rand(rows, n, generator=gen) * -40)
    if kind == "one_bin":  # distinct magnitudes within 1/64 binade: one bin, too many exact ranks, the radix sort
        return sign * (1 + torch.randperm(rows * n, generator=gen).reshape(rows, n).float() * 2.0**-23)
    if kind == "few_in_bins":  # pairs of close magnitudes share bins: a few exact ranks a row
        return sign * (1 + torch.randint(0, 2, (rows, n), generator=gen) * 2.0**-23) * torch.exp2(
            torch.randint(-8, 0, (rows, n), generator=gen).float())
    if kind == "ties":  # a handful of values, zeros among them: long runs of ties in index order
        return sign * torch.randint(0, 5, (rows, n), generator=gen).float() / 4
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["wide", "one_bin", "few_in_bins", "ties"])
@pytest.mark.parametrize("n", [33, 64, 100, 1024, 2048, 4099])
def test_della_mask_rank_decision_paths(kind, n):
    """The kernel decides most entries from the range of ranks of their magnitude's bin and ranks exactly only
    where the draw falls inside that range's probabilities; rows whose bins leave too many such entries are
    ranked whole (radix sort). Every path gives the torch path's mask (rows of 33 entries up to 4099: one to
    128 bins a binade)."""
    gen = torch.Generator().manual_seed(n)
    rows = max(2, 8192 // n)
    x = _magnitudes(kind, rows, n, gen)
    base = torch.zeros(rows, n)
    for density, epsilon in ((0.2, 0.1), (0.5, 0.45)):
        assert torch.equal(_kernel_mask(x, base, density, epsilon, 5, "w"), _torch_mask(x, base, density, epsilon, 5, "w"))


@pytest.mark.parametrize("table", ["falling", "flat", "nan"])
def test_della_mask_any_probability_table(table):
    """A keep-probability table that does not rise with the rank (DELLA's always does) is read by exact rank:
    keep = u < probs[stable rank] whatever the table."""
    rows, n = 6, 300
    gen = torch.Generator().manual_seed(2)
    x = _magnitudes("ties", rows, n, gen) + torch.randn(rows, n, generator=gen) * 0.01
    base = torch.zeros(rows, n)
    probs = {"falling": torch.linspace(0.9, 0.1, n), "flat": torch.full((n,), 0.3),
             "nan": torch.linspace(0.1, 0.9, n).index_fill_(0, torch.tensor([7]), float("nan"))}[table]
    seeds, skips, lengths = fused_sparse._segments(5, "w", 0, (rows, n), 0)
    out = torch.empty(rows * n, dtype=torch.uint8)
    fused_sparse._kernels.della_mask(out.numpy(), fused_sparse._raw(base), 0, fused_sparse._raw(x), 0, n, n, 1,
                                     probs.numpy(), seeds, skips, lengths)
    job = TensorJob("w", base, [x], {}, [{}], {}, 5)
    order = x.abs().argsort(dim=-1, stable=True)
    p = torch.empty_like(x).scatter_(-1, order, probs.expand_as(order))
    assert torch.equal(out.bool(), (job.uniform(0) < p).reshape(-1))


def test_della_mask_hand_computed():
    """One row [0.3, -0.1, 0.2, 0.1]: ascending stable ranks 3, 0, 2, 1 (the tied 0.1s in index order);
    density 0.5, epsilon 0.3 give p_r = 0.2 + 0.6 r / 3, so p = [0.8, 0.2, 0.6, 0.4], against the
    block's torch.rand draws."""
    base = torch.zeros(1, 4)
    x = torch.tensor([[0.3, -0.1, 0.2, 0.1]])
    gen = torch.Generator().manual_seed(fused_sparse.block_seed(7, "w", 0, 0))
    u = torch.rand(4, generator=gen)
    p = rank_probabilities(4, 0.5, 0.3)[torch.tensor([3, 0, 2, 1])]
    assert torch.allclose(p, torch.tensor([0.8, 0.2, 0.6, 0.4]))
    assert torch.equal(_kernel_mask(x, base, 0.5, 0.3, 7, "w"), u < p)


def test_della_keep_rate_follows_the_rank():
    """Property: over many rows, the entries of rank r are kept at rate p_r (linear in r, mean density)."""
    rows, n, density, epsilon = 4000, 16, 0.4, 0.3
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(rows, n)
    ramp = torch.arange(1, n + 1, dtype=torch.float32)  # magnitude rank = column
    x = ramp[torch.randperm(n, generator=gen)].expand(rows, n).contiguous() * torch.sign(torch.randn(rows, n, generator=gen))
    kept = _kernel_mask(x, base, density, epsilon, 3, "w").reshape(rows, n).float()
    rank = (x.abs() - 1).long()
    rate = torch.zeros(n).index_add_(0, rank.reshape(-1), kept.reshape(-1)) / rows
    expected = rank_probabilities(n, density, epsilon)
    sd = (expected * (1 - expected) / rows).sqrt()
    assert ((rate - expected).abs() < 5 * sd).all()
    assert abs(float(kept.mean()) - density) < 0.01


def test_della_masks_ignore_threads_and_chunking():
    rows, cols, density, epsilon = 600, 300, 0.3, 0.2
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(rows, cols, generator=gen).bfloat16()
    x = (base.float() + torch.randint(-9, 10, (rows, cols), generator=gen).float() / 128).bfloat16()
    whole = _kernel_mask(x, base, density, epsilon, 3, "w")

    def chunk(bounds):
        a, b = bounds
        return _kernel_mask(x[a:b], base[a:b], density, epsilon, 3, "w", row_start=a)

    for threads, step in ((1, 600), (2, 7), (2, 113), (1, 1)):
        bounds = [(a, min(a + step, rows)) for a in range(0, rows, step)]
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(chunk, bounds))
        assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("shape", [(7,), (40, 600), (6, 5, 4)])
def test_della_mask_sums_the_rescale_norms(shape):
    """The kernel's (sum |tau|, sum |tau| kept) are the L1 kernel's sums over the same mask (float64, in
    another order: equal to float64 rounding) and the torch path's norms."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(shape, generator=gen).bfloat16()
    x = (base.float() + torch.randn(shape, generator=gen) * 0.01).bfloat16()
    chunk = raw_chunk(base, [x], 2, "w")
    mask, before, after = fused_sparse.della_mask(torch.empty(x.numel(), dtype=torch.uint8), chunk, 0, 0.3, 0.2)
    (ref_before, ref_after), = fused_sparse.l1_norms(chunk, [mask])
    assert before == pytest.approx(ref_before, rel=1e-12) and after == pytest.approx(ref_after, rel=1e-12)
    tau = (x.float() - base.float()).reshape(-1)
    assert before == pytest.approx(float(tau.abs().sum(dtype=torch.float64)), rel=1e-12)
    assert after == pytest.approx(float((tau * mask).abs().sum(dtype=torch.float64)), rel=1e-12)
    assert 0 < after < before


def test_della_mask_counts_non_finite_task_vectors():
    base = torch.zeros(3, 40)
    x = torch.randn(3, 40)
    x[1, 5] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        _kernel_mask(x, base, 0.5, 0.1, 0, "w")


# ---- the merge against the torch path -----------------------------------------------------------------


@pytest.mark.parametrize("n,rows", [(1, 1), (7, 1), (511, 1), (512, 1), (513, 1), (4099, 1), (1536, 3), (4096, 128)])
@pytest.mark.parametrize("dtypes,base_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("method_name,extra", [
    ("della", {}), ("della_linear", {}), ("della_linear", {"normalize": True, "lambda": 1.5}),
    ("della", {"rescale": False, "normalize": False, "lambda": 0.7}),
])
def test_della_kernel_matches_the_torch_path(n, rows, dtypes, base_dtype, out_dtype, method_name, extra):
    base, models = quantised_inputs(n, dtypes, base_dtype, seed=n + rows, rows=rows)
    method, params = method_params(method_name, **extra)
    model_params = DELLA_PARAMS[: len(models)]
    job = torch_job(method, base, models, params, model_params, seed=5)
    ours, stats = fused_run(method, base, models, params, model_params, out_dtype, seed=5)
    if "scales" in job.stats:  # float64 sums in another order: the same float32 factor
        assert [float(torch.tensor(s, dtype=torch.float32)) for s in stats["scales"]] == [
            float(torch.tensor(s, dtype=torch.float32)) for s in job.stats["scales"]]
    assert torch.equal(bits(ours), bits(method.merge(job).to(out_dtype)))


@pytest.mark.parametrize("method_name", ["della", "della_linear"])
def test_della_density_zero_and_one(method_name):
    """A model at density 1 is kept whole, one at density 0 dropped (+0, as della.py's zeros_like)."""
    base, models = quantised_inputs(1024, (torch.bfloat16,) * 3, torch.bfloat16, seed=3, rows=8)
    base[0, :4] = -0.0  # where +0 and -0 task vectors would give different output bits
    method, params = method_params(method_name)
    model_params = [dict(DELLA_PARAMS[0], density=1.0), dict(DELLA_PARAMS[1], density=0.0), DELLA_PARAMS[2]]
    job = torch_job(method, base, models, params, model_params, seed=2)
    ours, _ = fused_run(method, base, models, params, model_params, torch.bfloat16, seed=2)
    assert torch.equal(bits(ours), bits(method.merge(job).to(torch.bfloat16)))


# ---- through the engine ------------------------------------------------------------------------------


def _family(make_folder):
    """fused_util's family with a 3-d tensor too (a convolution's weight), between the matrices and the vectors."""
    shapes = {"embed.weight": (300, 16), "layer.weight": (48, 40), "conv.weight": (12, 6, 5), "layer.bias": (40,),
              "scale": ()}
    return fused_family(make_folder, shapes)


@pytest.mark.parametrize("method,params,threads", [
    ("della", {}, 2), ("della_linear", {}, 1), ("della_linear", {"normalize": True, "rescale": False}, 2),
])
def test_engine_della_is_the_same_with_and_without_the_kernels(make_folder, tmp_path, monkeypatch, method, params,
                                                               threads):
    from deltawise.merge import engine

    family = _family(make_folder)
    recipe = {"merge_method": method, "base_model": str(family["base"]), "seed": 4,
              "models": [{"model": str(family[m]), "parameters": {"weight": w, "density": d, "epsilon": e}}
                         for m, w, d, e in (("ft1", 0.5, 0.3, 0.1), ("ft2", 0.3, 0.5, 0.2), ("ft3", 0.9, 0.2, 0.15))],
              "parameters": params}
    calls = count_calls(monkeypatch, fused_sparse, "della_mask")
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)  # several chunks for the embedding
    merge(recipe, str(tmp_path / "fused"), threads=threads)
    assert len(calls) >= 6, "the fused path was not taken"
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 4000)  # another chunking: the same masks
    merge(recipe, str(tmp_path / "fused-other-chunks"), threads=3 - threads)
    monkeypatch.setattr(fused_sparse, "available", lambda: False)
    merge(recipe, str(tmp_path / "torch"), threads=threads)
    for name in ("fused", "fused-other-chunks"):
        assert_same_bits(tmp_path / name, tmp_path / "torch", label=name)


@pytest.mark.parametrize("method", ["della_linear", "dare_ties"])
def test_masks_drawn_by_the_rescale_pass_are_kept_for_the_merge(make_folder, tmp_path, monkeypatch, method):
    """Up to thresholds.KEEP_BYTES a tensor's keep masks are drawn once (by the L1 pass), above it drawn
    again for the merge: the same bits either way."""
    from deltawise.merge import engine, thresholds

    family = _family(make_folder)
    recipe = {"merge_method": method, "base_model": str(family["base"]), "seed": 9,
              "models": [{"model": str(family[m]), "parameters": {"weight": 1.0, "density": 0.4, "epsilon": 0.2}
                          if method.startswith("della") else {"weight": 1.0, "density": 0.4}} for m in ("ft1", "ft2")]}
    drawn = count_calls(monkeypatch, fused_sparse, "della_mask", "keep_mask")
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    merge(recipe, str(tmp_path / "kept"), threads=2)
    kept_draws, drawn[:] = len(drawn), []
    monkeypatch.setattr(thresholds, "KEEP_BYTES", 0)
    merge(recipe, str(tmp_path / "drawn-again"), threads=2)
    # in chunks of at most 1000 entries embed.weight (300 x 16) is 5 chunks and layer.weight (48 x 40) 2: their
    # 7 chunks' masks of 2 models are drawn again; single-chunk tensors are read once and keep theirs anyway
    assert len(drawn) == kept_draws + 7 * 2
    assert_same_bits(tmp_path / "kept", tmp_path / "drawn-again")
