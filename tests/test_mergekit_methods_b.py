"""mergekit 0.1.5's interpolation-family methods in deltawise: nuslerp, multislerp, karcher, ram,
ramplus_tl and passthrough.

Each case writes ONE recipe file and runs it through mergekit itself and through deltawise
(helpers shared with test_mergekit_compat.py), then compares every tensor: within atol=1e-6,
rtol=1e-5 for float32 models, within one bfloat16 ulp for bfloat16 models (mergekit then computes
in bfloat16, deltawise in float32). Each method also has a property that pins what it computes
independently of mergekit, and the methods that need whole-tensor statistics are checked to give
the same tensors whatever the row-chunk size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import perturb, save_llama
from test_mergekit_compat import (
    BF16_ATOL, BF16_RTOL, assert_not_a_copy, assert_same_tensors, entry, load_folder, run_deltawise, run_mergekit,
    run_both, write_recipe,
)

from deltawise.errors import RecipeError
from deltawise.merge.base import REGISTRY, merge_tensor


# --------------------------------------------------------------------------- fixtures


def _as_bfloat16(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_folder(src).items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return dst


@pytest.fixture(scope="module")
def bf16_family(llama_family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_bf16")
    return {name: _as_bfloat16(path, root / name) for name, path in llama_family.items()}


@pytest.fixture(scope="module")
def sparse_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_sparse")
    base = save_llama(root / "base", seed=3)
    family = {"base": base}
    for i in (1, 2, 3):
        # only about 40% of the entries change: task vectors whose supports partly overlap, so RAM's
        # 'one model changed it' and 'several did' cases both occur
        family[f"ft{i}"] = perturb(base, root / f"ft{i}", seed=30 + i, keep=0.4)
    return family


# --------------------------------------------------------------------------- recipes


def nuslerp_flatten_base(f):
    # the default nuslerp_flatten: true; task vectors of a base; t = 0.7 / (0.3 + 0.7)
    return {
        "merge_method": "nuslerp",
        "base_model": str(f["base"]),
        "models": [entry(f["ft1"], weight=0.3), entry(f["ft2"], weight=0.7)],
    }


def nuslerp_row_wise(f):
    # no base: the models themselves, one vector per column; weights from a filter list
    return {
        "merge_method": "nuslerp",
        "models": [entry(f["ft1"], weight=[{"filter": "mlp", "value": 2.0}, {"value": 1.0}]), entry(f["ft2"], weight=1.0)],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    }


def nuslerp_per_row(f):
    return {
        "merge_method": "nuslerp",
        "base_model": str(f["base"]),
        "models": [entry(f["base"]), entry(f["ft1"], weight=0.6), entry(f["ft3"], weight=0.2)],
        "parameters": {"nuslerp_flatten": False},
    }


def multislerp_base(f):
    return {
        "merge_method": "multislerp",
        "base_model": str(f["base"]),
        "models": [entry(f["ft1"], weight=0.5), entry(f["ft2"], weight=0.3), entry(f["ft3"], weight=0.9)],
    }


def multislerp_plain(f):
    # no base, unnormalised weights
    return {
        "merge_method": "multislerp",
        "models": [entry(f["ft1"], weight=1.0), entry(f["ft2"], weight=0.5), entry(f["ft3"], weight=0.25)],
        "parameters": {"normalize_weights": False},
    }


def karcher(f):
    # the base is not listed: mergekit appends it as a fourth input (plan.py normalize_config)
    return {"merge_method": "karcher", "base_model": str(f["base"]), "models": [entry(f[f"ft{i}"]) for i in (1, 2, 3)]}


def karcher_few_iterations(f):
    return {
        "merge_method": "karcher",
        "models": [entry(f["ft1"]), entry(f["ft2"]), entry(f["ft3"])],
        "parameters": {"max_iter": 1, "tol": 1e-7},  # one step: its size shows at 1e-4
    }


def ram(f):
    return {"merge_method": "ram", "base_model": str(f["base"]), "models": [entry(f[f"ft{i}"]) for i in (1, 2, 3)]}


def ramplus_tl(f):
    return {
        "merge_method": "ramplus_tl",
        "base_model": str(f["base"]),
        "models": [entry(f["base"]), entry(f["ft1"]), entry(f["ft2"]), entry(f["ft3"])],
        "parameters": {"r": 0.5, "alpha": 1.5, "epsilon": 1e-4},
    }


def ramplus_tl_defaults(f):
    return {"merge_method": "ramplus_tl", "base_model": str(f["base"]), "models": [entry(f[f"ft{i}"]) for i in (1, 2, 3)]}


def passthrough_scaled(f):
    return {
        "merge_method": "passthrough",
        "models": [entry(f["ft2"], scale=[{"filter": "mlp", "value": 0.5}, {"filter": "norm", "value": 2.0}])],
    }


# (recipe builder, family fixture, tolerance)
F32 = (1e-6, 1e-5)
BF16 = (BF16_ATOL, BF16_RTOL)
CASES = {
    "nuslerp-flatten-base": (nuslerp_flatten_base, "llama_family", F32),
    "nuslerp-row_wise-no-base": (nuslerp_row_wise, "llama_family", F32),
    "nuslerp-per-row-base-listed": (nuslerp_per_row, "llama_family", F32),
    "nuslerp-flatten-base-bf16": (nuslerp_flatten_base, "bf16_family", BF16),
    "nuslerp-row_wise-bf16": (nuslerp_row_wise, "bf16_family", BF16),
    "multislerp-base": (multislerp_base, "llama_family", F32),
    "multislerp-no-base-unnormalised": (multislerp_plain, "llama_family", F32),
    "multislerp-base-bf16": (multislerp_base, "bf16_family", BF16),
    "karcher-base-appended": (karcher, "llama_family", F32),
    "karcher-max_iter-tol": (karcher_few_iterations, "llama_family", F32),
    "karcher-bf16": (karcher, "bf16_family", BF16),
    "ram": (ram, "sparse_family", F32),
    "ram-dense": (ram, "llama_family", F32),
    "ramplus_tl": (ramplus_tl, "sparse_family", F32),
    "ramplus_tl-defaults": (ramplus_tl_defaults, "sparse_family", F32),
    "passthrough-scale-filters": (passthrough_scaled, "llama_family", F32),
    "passthrough-scale-filters-bf16": (passthrough_scaled, "bf16_family", BF16),
}


@pytest.mark.parametrize("build, family_name, tolerance", [pytest.param(*v, id=k) for k, v in CASES.items()])
def test_recipe_gives_mergekit_tensors(request, run_both, build, family_name, tolerance):
    family = request.getfixturevalue(family_name)
    recipe = build(family)
    theirs, ours = run_both(recipe)
    atol, rtol = tolerance
    assert_same_tensors(theirs, ours, atol=atol, rtol=rtol, label=request.node.callspec.id)
    assert_not_a_copy(ours, {Path(e["model"]).name: load_folder(Path(e["model"])) for e in recipe["models"]})


def test_ram_cases_are_exercised(sparse_family):
    """The sparse family really has entries changed by one model and entries changed by several
    (else the ram cases above would only test an average)."""
    base = load_folder(sparse_family["base"])
    name = "model.layers.0.mlp.up_proj.weight"
    counts = sum((load_folder(sparse_family[f"ft{i}"])[name] - base[name]).abs() > 1e-5 for i in (1, 2, 3))
    assert 0.2 < float((counts == 1).float().mean()) < 0.6 and 0.1 < float((counts > 1).float().mean()) < 0.5


# --------------------------------------------------------------------------- chunking


CHUNKED = {
    "nuslerp-flatten": nuslerp_flatten_base,
    "nuslerp-row_wise": nuslerp_row_wise,
    "multislerp": multislerp_base,
    "karcher": karcher,
    "ramplus_tl": ramplus_tl,
}


@pytest.mark.parametrize("name", list(CHUNKED))
def test_whole_tensor_statistics_do_not_depend_on_chunking(name, llama_family, sparse_family, tmp_path, monkeypatch):
    """Norms, Gram matrices and overlap counts are of whole tensors even when the engine reads
    them in row chunks (here 256 entries: 8 rows of the 32-wide tensors)."""
    family = sparse_family if name.startswith("ram") else llama_family
    recipe_path = write_recipe(tmp_path / "recipe.yaml", CHUNKED[name](family))
    whole = run_deltawise(recipe_path, tmp_path / "whole")
    monkeypatch.setattr("deltawise.merge.engine.CHUNK_ELEMENTS", 256)
    chunked = run_deltawise(recipe_path, tmp_path / "chunked")
    assert_same_tensors(whole, chunked, atol=1e-7, rtol=1e-6, label=f"{name} chunked")


# --------------------------------------------------------------------------- properties


def merge_in_memory(name: str, base, models, params=None, model_params=None) -> torch.Tensor:
    cls = REGISTRY[name]
    resolved = {p.name: p.default for p in cls.params if p.scope == "global"} | (params or {})
    defaults = {p.name: p.default for p in cls.params if p.scope == "model"}
    per_model = [defaults | mp for mp in (model_params or [{}] * len(models))]
    return merge_tensor(cls(), base, models, resolved, per_model)


def test_nuslerp_end_weights_give_each_model(llama_family, tmp_path):
    """weights (1, 0) give the first model, (0, 1) the second, in task-vector mode too."""
    states = {k: load_folder(llama_family[k]) for k in ("base", "ft1", "ft2")}
    for weights, expected in (((1.0, 0.0), "ft1"), ((0.0, 1.0), "ft2")):
        recipe = nuslerp_flatten_base(llama_family)
        for e, w in zip(recipe["models"], weights):
            e["parameters"]["weight"] = w
        out = run_deltawise(write_recipe(tmp_path / f"{expected}.yaml", recipe), tmp_path / expected)
        assert_same_tensors(states[expected], out, label=f"nuslerp weights {weights}")


def test_nuslerp_half_way_is_the_geodesic_midpoint():
    """At t = 1/2 slerp of two vectors of equal norm is their normalised sum times that norm."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    b = b * a.norm() / b.norm()
    out = merge_in_memory("nuslerp", None, [a, b])
    torch.testing.assert_close(out, (a + b) / (a + b).norm() * a.norm(), atol=1e-6, rtol=1e-5)
    rows = merge_in_memory("nuslerp", None, [a, b], {"nuslerp_flatten": False})
    assert not torch.allclose(rows, out, atol=1e-4), "per-row interpolation must differ from the whole-tensor one"


def test_multislerp_of_two_models_is_slerp_at_equal_norms_and_weights():
    """mergekit's multislerp docstring: 'barycentric interpolation on a hypersphere'; for two
    points of equal norm and equal weights that is the slerp midpoint (nuslerp at t = 1/2)."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(12, 10, generator=gen)
    a, b = torch.randn(12, 10, generator=gen), torch.randn(12, 10, generator=gen)
    b = b * a.norm() / b.norm()
    multi = merge_in_memory("multislerp", base, [base + a, base + b])
    nu = merge_in_memory("nuslerp", base, [base + a, base + b])
    torch.testing.assert_close(multi, nu, atol=1e-6, rtol=1e-5)
    # unequal weights: no longer the midpoint, and it moves towards the heavier model
    heavy = merge_in_memory("multislerp", base, [base + a, base + b], model_params=[{"weight": 3.0}, {"weight": 1.0}])
    assert float((heavy - base - a).norm()) < float((multi - base - a).norm())


def test_karcher_of_identical_models_is_that_model(llama_family, tmp_path):
    twin = tmp_path / "ft1_copy"
    shutil.copytree(llama_family["ft1"], twin)
    recipe = {"merge_method": "karcher", "models": [entry(llama_family["ft1"]), entry(twin)]}
    out = run_deltawise(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "out")
    assert_same_tensors(load_folder(llama_family["ft1"]), out, label="karcher of one model twice")


def test_karcher_of_two_models_is_the_geodesic_midpoint():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(20, 6, generator=gen), torch.randn(20, 6, generator=gen)
    b = b * a.norm() / b.norm()
    out = merge_in_memory("karcher", None, [a, b], {"max_iter": 50, "tol": 1e-9})
    torch.testing.assert_close(out, (a + b) / (a + b).norm() * a.norm(), atol=1e-6, rtol=1e-5)


def test_ram_keeps_a_lone_change_whole_and_averages_shared_ones():
    base = torch.zeros(4, 3)
    tau1 = torch.tensor([[1.0, 0, 2], [0, 0, 0], [4, 4, 0], [0, 0, 0]])
    tau2 = torch.tensor([[0.0, 3, 4], [0, 0, 0], [2, 0, 0], [0, 5, 0]])
    out = merge_in_memory("ram", base, [base + tau1, base + tau2])
    expected = torch.tensor([[1.0, 3, 3], [0, 0, 0], [3, 4, 0], [0, 5, 0]])
    torch.testing.assert_close(out, expected)
    # disjoint supports: every change is kept whole, i.e. task arithmetic with unit weights
    disjoint = merge_in_memory("ram", base, [base + tau1 * (tau2 == 0), base + tau2 * (tau1 == 0)])
    summed = merge_in_memory("task_arithmetic", base, [base + tau1 * (tau2 == 0), base + tau2 * (tau1 == 0)])
    torch.testing.assert_close(disjoint, summed)


def test_ramplus_tl_scales_lone_changes_by_the_overlap_ratio():
    base = torch.zeros(2, 4)
    tau1 = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])  # 4 changed: 1 shared, 3 alone -> rho 1/3
    tau2 = torch.tensor([[0.0, 0, 0, 2], [4, 0, 0, 0]])  # 2 changed: 1 shared, 1 alone -> rho 1
    out = merge_in_memory("ramplus_tl", base, [base + tau1, base + tau2], {"r": 0.3, "alpha": 0.5})
    lam1, lam2 = 1 + 0.3 * (1 / 3), 1 + 0.3 * 0.5  # rho clipped at alpha = 0.5
    expected = torch.tensor([[lam1, lam1, lam1, 2 * lam2], [2.5, 0, 0, 0]])
    torch.testing.assert_close(out, expected)
    plain = merge_in_memory("ram", base, [base + tau1, base + tau2])
    torch.testing.assert_close(merge_in_memory("ramplus_tl", base, [base + tau1, base + tau2], {"r": 0.0}), plain)


def test_passthrough_without_scale_copies_the_bytes(bf16_family, tmp_path):
    recipe = {"merge_method": "passthrough", "models": [entry(bf16_family["ft3"])]}
    out = run_deltawise(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "out")
    source = load_folder(bf16_family["ft3"])
    assert set(out) == set(source) and all(torch.equal(out[k], source[k]) for k in source)


@pytest.mark.parametrize(
    "recipe, message",
    [
        (lambda f: {"merge_method": "nuslerp", "models": [entry(f[k]) for k in ("ft1", "ft2", "ft3")]}, "at most 2"),
        (lambda f: {"merge_method": "nuslerp", "base_model": str(f["base"]), "models": [entry(f["ft1"])]}, "at least 2"),
        (lambda f: {"merge_method": "passthrough", "base_model": str(f["base"]), "models": [entry(f["ft1"])]}, "at most 1"),
        (lambda f: {"merge_method": "ram", "models": [entry(f["ft1"]), entry(f["ft2"])]}, "needs base_model"),
    ],
    ids=["nuslerp-three-models", "nuslerp-one-model", "passthrough-with-a-base", "ram-without-base"],
)
def test_input_counts_refused_as_mergekit_does(llama_family, tmp_path, recipe, message):
    with pytest.raises(RecipeError, match=message):
        run_deltawise(write_recipe(tmp_path / "recipe.yaml", recipe(llama_family)), tmp_path / "out")


def test_multislerp_of_cancelling_inputs_falls_back_or_is_refused():
    """As mergekit: a vanishing weighted mean falls back to the weighted sum for two models and
    is an error for more."""
    from deltawise.errors import DeltawiseError

    a = torch.arange(1.0, 7.0).reshape(2, 3)
    torch.testing.assert_close(merge_in_memory("multislerp", None, [a, -a]), 0.5 * a + 0.5 * -a)
    with pytest.raises(DeltawiseError, match="antipodal"):
        merge_in_memory("multislerp", None, [a, -a, a.flip(0)], model_params=[{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}])
