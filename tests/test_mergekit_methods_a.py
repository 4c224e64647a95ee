"""mergekit 0.1.5's della, della_linear, sce, nearswap and arcee_fusion in deltawise.

Each deterministic case writes ONE recipe file, runs it through mergekit itself and through
deltawise on tiny Llama models, and compares every tensor (helpers from test_mergekit_compat.py).
float32 models must agree within atol=1e-6, rtol=1e-5. bfloat16 models: mergekit computes in the
stored dtype (bf16 arithmetic) unless the recipe says ``dtype: float32``, deltawise always in
float32, so the bf16 cases use ``dtype: float32, out_dtype: bfloat16`` and must be bit-identical,
apart from SCE's choice among entries whose variance ties at the selection threshold (bf16 deltas
take few distinct values; torch.topk leaves that choice unspecified, deltawise keeps the first).
DELLA is random (mergekit draws from torch's global generator, deltawise from DARE's seeded block
generator), so its masks are compared by their statistics over seeds; with density 1 it is
deterministic and compared tensor by tensor. Each method also has a property test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_mergekit_compat import (
    assert_not_a_copy,
    assert_same_tensors,
    entry,
    load_folder,
    run_both,
    run_deltawise,
    run_mergekit,
    write_recipe,
)

from deltawise.errors import DeltawiseError
from deltawise.merge import engine as engine_module
from deltawise.merge.base import TensorJob, merge_tensor
from deltawise.merge.methods.arcee_fusion import ArceeFusion
from deltawise.merge.methods.della import DellaLinear, keep_probabilities
from deltawise.merge.methods.sce import Sce, selection_mask

# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def bf16_family(llama_family, tmp_path_factory) -> dict[str, Path]:
    """``llama_family`` stored in bfloat16."""
    root = tmp_path_factory.mktemp("llama_bf16")
    family = {}
    for name, folder in llama_family.items():
        out = root / name
        out.mkdir()
        state = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
        family[name] = out
    return family


def nearswap(f, t=0.01):
    # |ft1 - base| ~ 0.01: t = 0.01 swaps some entries entirely and moves the others part of the way
    return {"merge_method": "nearswap", "base_model": str(f["base"]), "models": [entry(f["ft1"])], "parameters": {"t": t}}


def nearswap_gradient(f):
    recipe = nearswap(f)
    recipe["parameters"]["t"] = [{"filter": "mlp", "value": [0.002, 0.03]}, {"value": 0.008}]
    return recipe


def nearswap_base_listed(f):
    return {**nearswap(f), "models": [entry(f["base"]), entry(f["ft2"])]}


def arcee_fusion(f):
    return {"merge_method": "arcee_fusion", "base_model": str(f["base"]), "models": [entry(f["ft2"])]}


def sce(f, **parameters):
    recipe = {"merge_method": "sce", "base_model": str(f["base"]), "models": [entry(f[f"ft{i}"]) for i in (1, 2, 3)]}
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def sce_select(f):
    return sce(f, select_topk=0.3)


def sce_select_filtered(f):
    return sce(f, select_topk=[{"filter": "self_attn", "value": 0.1}, {"value": [0.5, 0.8]}], int8_mask=True)


def della_dense(f, method="della"):
    # density 1 draws nothing: the deterministic rest of the method (weights, sign consensus,
    # normalize, lambda) against mergekit tensor by tensor
    return {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": [entry(f["ft1"], weight=0.5), entry(f["ft2"], weight=1.0), entry(f["ft3"], weight=0.8)],
        "parameters": {"lambda": 0.9},
    }


def della_linear_dense(f):
    recipe = della_dense(f, "della_linear")
    recipe["parameters"]["normalize"] = True
    return recipe


CASES = {
    "nearswap": nearswap,
    "nearswap-filtered-gradient": nearswap_gradient,
    "nearswap-base-in-models": nearswap_base_listed,
    "arcee_fusion": arcee_fusion,
    "sce": sce,
    "sce-select_topk": sce_select,
    "sce-select_topk-filtered-gradient": sce_select_filtered,
    "della-density-1": della_dense,
    "della_linear-density-1": della_linear_dense,
}


# --------------------------------------------------------------------------- deterministic: same tensors as mergekit


@pytest.mark.parametrize("build", CASES.values(), ids=CASES.keys())
def test_float32_recipe_gives_mergekit_tensors(request, llama_family, run_both, build):
    recipe = build(llama_family)
    theirs, ours = run_both(recipe)
    assert_same_tensors(theirs, ours, label=request.node.callspec.id)
    assert_not_a_copy(ours, {Path(e["model"]).name: load_folder(Path(e["model"])) for e in recipe["models"]})


def variance_ties_only(family, theirs, ours, topk: float) -> None:
    """Every entry where SCE's outputs differ has a variance equal to the selection threshold."""
    base = load_folder(family["base"])
    tuned = [load_folder(family[f"ft{i}"]) for i in (1, 2, 3)]
    differing = 0
    for name in theirs:
        diff = theirs[name] != ours[name]
        if not bool(diff.any()):
            continue
        var = torch.var(torch.stack([t[name].float() - base[name].float() for t in tuned]), dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * topk)
        threshold = var.reshape(-1).sort(descending=True).values[k - 1]
        assert bool((var[diff] == threshold).all()), f"{name}: outputs differ away from the variance ties"
        differing += int(diff.sum())
    assert differing < 50, f"{differing} entries differ"


@pytest.mark.parametrize(
    "build", [nearswap, arcee_fusion, sce, sce_select], ids=["nearswap", "arcee_fusion", "sce", "sce-select"],
)
def test_bfloat16_models_computed_in_float32_give_mergekit_bits(bf16_family, run_both, build):
    recipe = {**build(bf16_family), "dtype": "float32", "out_dtype": "bfloat16"}
    theirs, ours = run_both(recipe)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    if build is sce_select:
        variance_ties_only(bf16_family, theirs, ours, 0.3)
        ours = {k: torch.where(theirs[k] != ours[k], theirs[k], ours[k]) for k in ours}
    assert_same_tensors(theirs, ours, atol=0, rtol=0, label=build.__name__)
    assert_not_a_copy(ours, {Path(e["model"]).name: load_folder(Path(e["model"])) for e in recipe["models"]})


def test_bfloat16_nearswap_in_bf16_arithmetic_within_one_ulp(bf16_family, run_both):
    """Without ``dtype``, mergekit computes NearSwap in bf16; deltawise's float32 result, rounded
    once, agrees to about one bf16 ulp."""
    theirs, ours = run_both(nearswap(bf16_family))
    assert_same_tensors(theirs, ours, atol=1e-3, rtol=1e-2, label="nearswap bf16")


# --------------------------------------------------------------------------- streaming: chunking changes nothing


@pytest.mark.parametrize(
    "build", [nearswap, arcee_fusion, sce_select, lambda f: {**della_dense(f), "seed": 3}],
    ids=["nearswap", "arcee_fusion", "sce-select", "della-seeded"],
)
def test_row_chunks_give_the_whole_tensor_result(llama_family, tmp_path, monkeypatch, build):
    recipe = build(llama_family)
    if recipe["merge_method"] == "della":
        for model in recipe["models"]:
            model["parameters"].update(density=0.4, epsilon=0.2)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    whole = run_deltawise(path, tmp_path / "whole")
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 100)  # 3 rows of 32 per chunk
    chunked = run_deltawise(path, tmp_path / "chunked")
    assert_same_tensors(whole, chunked, atol=0, rtol=0, label="chunked")


def chunk_jobs(method, base, models, params, model_params, rows: int, name="w", seed=0) -> list[TensorJob]:
    """Jobs of ``rows``-row chunks sharing one stats dict, after the method's per-tensor passes ran
    over all of them (what the engine does)."""
    stats: dict = {}
    jobs = [
        TensorJob(name, base[s : s + rows], [m[s : s + rows] for m in models], params, model_params, stats, seed, row_start=s)
        for s in range(0, base.shape[0], rows)
    ]
    for stats_pass in method.tensor_passes(params, model_params, base.numel(), stats):
        for job in jobs:
            stats_pass.update(job)
    return jobs


def test_sce_selects_exactly_k_entries_first_ties_first_across_chunks():
    """With heavily tied variances, exactly k = int(select_topk * nonzero) entries are selected,
    those above the threshold and then the first tied ones in row-major order, whatever the chunking."""
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(12, 10)
    models = [torch.randint(-2, 3, (12, 10), generator=gen).float() for _ in range(3)]
    var = torch.var(torch.stack(models), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * 0.35)
    threshold = var.reshape(-1).sort(descending=True).values[k - 1]
    tied = (var == threshold).reshape(-1)
    assert int(tied.sum()) > 3, "the case must have ties at the threshold"
    expected = (var > threshold).reshape(-1)
    expected |= tied & (tied.cumsum(0) <= k - int(expected.sum()))
    for rows in (1, 5, 12):
        jobs = chunk_jobs(Sce(), base, models, {"select_topk": 0.35, "int8_mask": False}, [{}, {}, {}], rows)
        mask = torch.cat([selection_mask(job) for job in jobs])
        assert int(mask.sum()) == k
        assert torch.equal(mask.reshape(-1), expected), f"rows per chunk {rows}"


def test_sce_single_model_returns_itself_and_selection_bounds_changes(llama_family, tmp_path):
    base, tuned = load_folder(llama_family["base"]), load_folder(llama_family["ft1"])
    recipe = {"merge_method": "sce", "base_model": str(llama_family["base"]), "models": [entry(llama_family["ft1"])]}
    out = run_deltawise(write_recipe(tmp_path / "one.yaml", recipe), tmp_path / "one")
    assert_same_tensors(tuned, out, label="sce of one model")
    # with two models, select_topk 0.2 changes at most 20% of the entries whose variance is nonzero
    recipe = sce(llama_family, select_topk=0.2)
    recipe["models"] = recipe["models"][:2]
    out = run_deltawise(write_recipe(tmp_path / "two.yaml", recipe), tmp_path / "two")
    for name, b in base.items():
        changed = int((out[name] != b).sum())
        assert 0 < changed <= int(0.2 * b.numel()), f"{name}: {changed} of {b.numel()} entries changed"


# --------------------------------------------------------------------------- NearSwap and Arcee Fusion properties


def test_nearswap_t0_is_the_base_and_large_t_the_other_model():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 7, generator=gen), torch.randn(6, 7, generator=gen)
    from deltawise.merge.methods.nearswap import NearSwap

    assert torch.equal(merge_tensor(NearSwap(), a, [b], {"t": 0.0}, [{}]), a)
    assert torch.equal(merge_tensor(NearSwap(), a, [b], {"t": float((a - b).abs().max())}, [{}]), b)
    # in between: entries within t of the base are swapped, the others move by exactly t towards b
    t = 0.5
    out = merge_tensor(NearSwap(), a, [b], {"t": t}, [{}])
    close = (a - b).abs() <= t
    torch.testing.assert_close(out[close], b[close])
    torch.testing.assert_close((out - a).abs()[~close], torch.full_like(a[~close], t))


def test_nearswap_takes_exactly_one_model_besides_the_base(llama_family, tmp_path):
    recipe = nearswap(llama_family)
    recipe["models"].append(entry(llama_family["ft2"]))
    with pytest.raises(DeltawiseError, match="at most 1 model"):
        run_deltawise(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")


def test_arcee_fusion_takes_outlier_entries_of_the_other_model(llama_family, tmp_path):
    base, other = load_folder(llama_family["base"]), load_folder(llama_family["ft2"])
    out = run_deltawise(write_recipe(tmp_path / "r.yaml", arcee_fusion(llama_family)), tmp_path / "out")
    taken_total = 0
    for name, a in base.items():
        taken = out[name] != a
        taken_total += int(taken.sum())
        # each entry is the base's or the other model's (a + (b - a) rounds to within an ulp of b)
        torch.testing.assert_close(out[name][taken], other[name][taken], atol=1e-6, rtol=0)
        # above median + 1.5 IQR: outliers only, never most entries
        assert int(taken.sum()) < 0.25 * a.numel(), f"{name}: {int(taken.sum())} of {a.numel()} taken"
    assert taken_total > 0
    # a model fused with itself is itself
    a = base["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(merge_tensor(ArceeFusion(), a, [a.clone()], {}, [{}]), a)


# --------------------------------------------------------------------------- DELLA: statistics over seeds

DENSITY, EPSILON = 0.5, 0.3
# not 1-3: the fixtures' task vectors are torch.randn noise drawn from generators seeded 1, 2, 3,
# and mergekit's Bernoulli draws from the global generator would replay the same stream, so its
# masks would correlate with the very magnitudes they are ranked by (seed 1: flat keep rates)
SEEDS = (1000, 1001)
BANDS = 4


def della_recipe(f, method: str) -> dict:
    return {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": [entry(f["ft1"], weight=1.0, density=DENSITY, epsilon=EPSILON)],
    }


@pytest.fixture(scope="module")
def della_runs(llama_family, tmp_path_factory):
    """Single-model DELLA outputs over seeds, for both tools and both methods (mergekit gets its
    seed through MergeOptions.random_seed, deltawise through the recipe's ``seed``)."""
    root = tmp_path_factory.mktemp("della")
    runs = {}
    for method in ("della", "della_linear"):
        recipe = della_recipe(llama_family, method)
        path = write_recipe(root / f"{method}.yaml", recipe)
        runs[(method, "mergekit")] = [run_mergekit(path, root / f"{method}-mk-{s}", seed=s) for s in SEEDS]
        runs[(method, "deltawise")] = [
            run_deltawise(write_recipe(root / f"{method}-{s}.yaml", {**recipe, "seed": s}), root / f"{method}-dw-{s}")
            for s in SEEDS
        ]
    return runs


DELLA_IDS = [pytest.param(m, tool, id=f"{m}-{tool}") for m in ("della", "della_linear") for tool in ("mergekit", "deltawise")]


def row_rank_fraction(tau: torch.Tensor) -> torch.Tensor:
    """(rank - 1) / (n - 1) of |tau| within each row (a vector is one row)."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    rank = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
    return (rank / (rows.shape[1] - 1)).reshape(tau.shape)


@pytest.mark.parametrize("method, tool", DELLA_IDS)
def test_della_keep_rate_rises_with_magnitude_rank(llama_family, della_runs, method, tool):
    """Kept fraction per quarter of the magnitude ranks: the mean keep probability of the band,
    density - epsilon + 2 epsilon * (mean rank fraction), i.e. 0.275, 0.425, 0.575, 0.725."""
    base, tuned = load_folder(llama_family["base"]), load_folder(llama_family["ft1"])
    for out in della_runs[(method, tool)]:
        kept, total, expected = torch.zeros(BANDS), torch.zeros(BANDS), torch.zeros(BANDS)
        for name, b in base.items():
            tau = tuned[name] - b
            assert bool((tau != 0).all()), "the fixture's task vector should have no zero entry"
            fraction = row_rank_fraction(tau).reshape(-1)
            band = (fraction * BANDS).clamp(max=BANDS - 1e-3).long()
            kept.index_add_(0, band, (out[name] != b).float().reshape(-1))
            total += torch.bincount(band, minlength=BANDS)
            expected.index_add_(0, band, DENSITY - EPSILON + 2 * EPSILON * fraction)
        rates, wanted = kept / total, expected / total
        # ~6700 entries per band: binomial std < 0.007
        assert (rates - wanted).abs().max() < 0.035, f"{tool} {method}: kept {rates.tolist()}, expected {wanted.tolist()}"


@pytest.mark.parametrize("method, tool", DELLA_IDS)
def test_della_rescale_keeps_the_l1_norm_of_each_tensor(llama_family, della_runs, method, tool):
    """Survivors are scaled by one factor per tensor, ||tau||_1 / ||m tau||_1 (mergekit's L1
    rescale), and the kept L1 mass is what the keep probabilities predict (within 5 sigma)."""
    base, tuned = load_folder(llama_family["base"]), load_folder(llama_family["ft1"])
    for out in della_runs[(method, tool)]:
        for name, b in base.items():
            tau, got = (tuned[name] - b).double(), (out[name] - b).double()
            kept = got != 0
            scale = float(tau.abs().sum() / tau[kept].abs().sum())
            error = (got - scale * tau * kept).abs()
            assert bool((error <= 8 * torch.finfo(torch.float32).eps * (b.double().abs() + (scale * tau).abs())).all()), name
            p = DENSITY - EPSILON + 2 * EPSILON * row_rank_fraction(tau)
            mean, std = float((p * tau.abs()).sum()), float((p * (1 - p) * tau.square()).sum().sqrt())
            assert abs(float(tau[kept].abs().sum()) - mean) < 5 * std, f"{tool} {method} {name}"


def test_della_seeds_change_masks_and_a_seed_repeats(llama_family, della_runs, tmp_path):
    ours = della_runs[("della_linear", "deltawise")]
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ours[0][name], ours[1][name])
    recipe = {**della_recipe(llama_family, "della_linear"), "seed": SEEDS[1]}
    again = run_deltawise(write_recipe(tmp_path / "again.yaml", recipe), tmp_path / "again")
    assert_same_tensors(ours[1], again, atol=0, rtol=0, label="same seed")


def test_della_keep_probabilities_follow_the_row_ranks():
    delta = torch.tensor([[0.3, -0.1, 0.2, -0.4, 0.0], [1.0, 2.0, -3.0, 4.0, 5.0]])
    probs = keep_probabilities(delta, density=0.5, epsilon=0.2)
    steps = torch.tensor([[3, 1, 2, 4, 0], [0, 1, 2, 3, 4]]) / 4
    torch.testing.assert_close(probs, 0.3 + 0.4 * steps)
    vector = keep_probabilities(torch.tensor([0.5, -2.0, 1.0]), density=0.4, epsilon=0.1)
    torch.testing.assert_close(vector, torch.tensor([0.3, 0.5, 0.4]))
    # one model at density 1 is returned as it is (nothing drawn, nothing rescaled)
    gen = torch.Generator().manual_seed(2)
    base, model = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    params = {"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False}
    out = merge_tensor(DellaLinear(), base, [model], params, [{"weight": 1.0, "density": 1.0, "epsilon": 0.15}])
    torch.testing.assert_close(out, model)


def test_della_epsilon_outside_the_density_range_is_refused_before_merging(llama_family, tmp_path):
    recipe = della_recipe(llama_family, "della")
    recipe["models"][0]["parameters"].update(density=0.9, epsilon=0.15)
    with pytest.raises(DeltawiseError, match="epsilon 0.15 gives keep probabilities 0.75..1.05"):
        run_deltawise(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()
