"""Top-k selection among equal magnitudes (issue 23): on bfloat16 and float16 checkpoints the
k-th largest |task vector| entry is usually tied, and TIES / Breadcrumbs must keep exactly the
entries mergekit 0.1.5 keeps (its CPU sort order, see deltawise/merge/thresholds.py), bit for
bit, whatever the engine's chunking; ``tie_rule: all`` keeps every tie instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltawise.merge.engine as engine_module
from conftest import perturb, save_llama
from deltawise.merge.sparsify import band_counts
from deltawise.merge.thresholds import TieOrder, _Window, chunk_offset
from test_mergekit_compat import entry, load_folder, run_deltawise, run_mergekit, write_recipe

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _cast_folder(folder: Path, dtype: torch.dtype, name: str) -> None:
    for f in folder.glob("*.safetensors"):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(state, f, metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = name
    config_path.write_text(json.dumps(config))


@pytest.fixture(scope="module", params=sorted(DTYPES))
def half_family(request, tmp_path_factory) -> dict:
    """A tiny Llama stored in bf16 or fp16 and three fine-tunes (base + noise, stored likewise)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"family_{name}")
    base = save_llama(root / "base", seed=0)
    _cast_folder(base, DTYPES[name], name)
    family = {"base": base, "dtype": name}
    for i in range(3):
        family[f"ft{i + 1}"] = perturb(base, root / f"ft{i + 1}", seed=10 + i, scale=0.01)
    return family


def _ties(f, **parameters) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [entry(f[f"ft{i + 1}"], weight=w, density=0.2) for i, w in enumerate((0.5, 1.0, 0.8))],
        "parameters": parameters,
        "dtype": "float32",
        "out_dtype": f["dtype"],
    }


def _breadcrumbs(f, method: str = "breadcrumbs", **parameters) -> dict:
    return {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": [entry(f[f"ft{i + 1}"], weight=w) for i, w in enumerate((0.5, 0.3, 0.4))],
        "parameters": {"density": 0.3, "gamma": 0.05, **parameters},
        "dtype": "float32",
        "out_dtype": f["dtype"],
    }


RECIPES = {
    "ties": _ties,
    "breadcrumbs": _breadcrumbs,
    "breadcrumbs_ties": lambda f, **p: _breadcrumbs(f, "breadcrumbs_ties", **p),
}


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, int]:
    assert set(a) == set(b)
    return {k: int((a[k].view(torch.int16) != b[k].view(torch.int16)).sum()) for k in a
            if a[k].dtype == b[k].dtype and not torch.equal(a[k], b[k])} | {
        k: -1 for k in a if a[k].dtype != b[k].dtype}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_bit_identical_to_mergekit_on_half_precision(half_family, method, tmp_path, monkeypatch):
    """Exactly mergekit's bits, with one chunk per tensor and with many row chunks per tensor."""
    recipe_path = write_recipe(tmp_path / "recipe.yaml", RECIPES[method](half_family))
    theirs = run_mergekit(recipe_path, tmp_path / "mergekit")
    ours = run_deltawise(recipe_path, tmp_path / "deltawise")
    assert _differing(theirs, ours) == {}
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 300)  # several row chunks for every matrix
    chunked = run_deltawise(recipe_path, tmp_path / "deltawise_chunked")
    assert _differing(theirs, chunked) == {}
    # the comparison is not vacuous: keeping every tie gives other tensors on these checkpoints
    all_ties = write_recipe(tmp_path / "all.yaml", RECIPES[method](half_family, tie_rule="all"))
    assert _differing(theirs, run_deltawise(all_ties, tmp_path / "deltawise_all"))


def _ties_at_kth(magnitudes: torch.Tensor, k: int) -> int:
    kth = magnitudes.sort(descending=True).values[k - 1]
    return int((magnitudes == kth).sum())


def test_tie_order_keeps_exactly_k_in_mergekit_order():
    """TieOrder over chunks keeps the entries of mergekit's own ``sparsify.magnitude`` mask."""
    from mergekit.sparsify import magnitude, magnitude_outliers

    gen = torch.Generator().manual_seed(3)
    tau = torch.randint(-20, 21, (40, 50), generator=gen).float() / 1024  # 21 magnitudes: ties everywhere
    n, k = tau.numel(), int(0.2 * tau.numel())
    assert _ties_at_kth(tau.abs().reshape(-1), k) > 50
    reference = magnitude(tau, density=0.2) != 0
    # mergekit's sort is not stable: keeping the first ties by index would give another mask
    stable = torch.zeros(n, dtype=torch.bool)
    stable[torch.argsort(tau.abs().reshape(-1), descending=True, stable=True)[:k]] = True
    assert not torch.equal(stable, reference.reshape(-1))

    class Job:  # the parts of a TensorJob that TieOrder and chunk_offset read
        def __init__(self, rows: slice):
            self.models, self.row_start = [tau[rows]], rows.start

        def deltas(self):
            return [self.models[0]]

    magnitudes = tau.abs().reshape(-1)
    kth = float(magnitudes.sort(descending=True).values[k - 1])
    tie_pass = TieOrder(n, {0: _Window(descending=True, start=0, stop=k, boundaries=(kth,))})
    for start in range(0, 40, 7):
        job = Job(slice(start, min(start + 7, 40)))
        assert chunk_offset(job) == start * 50
        tie_pass.update(job)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[magnitudes > kth] = True
    kept[tie_pass.kept[0]] = True
    assert int(kept.sum()) == k
    assert torch.equal(kept, reference.reshape(-1))

    n_bot, n_keep = band_counts(n, 0.3, 0.05)
    ascending = magnitudes.sort().values
    lo, hi = float(ascending[n_bot]), float(ascending[n_bot + n_keep - 1])
    band_pass = TieOrder(n, {0: _Window(descending=False, start=n_bot, stop=n_bot + n_keep, boundaries=(lo, hi))})
    band_pass.update(Job(slice(0, 40)))
    kept = (magnitudes > lo) & (magnitudes < hi)
    kept[band_pass.kept[0]] = True
    assert int(kept.sum()) == n_keep
    assert torch.equal(kept, (magnitude_outliers(tau, density=0.3, gamma=0.05) != 0).reshape(-1))


def _stable_expected(base: dict, ft: dict, method: str) -> dict[str, torch.Tensor]:
    """base + the task vector masked by a stable sort's top-k (TIES) or band (Breadcrumbs), per tensor."""
    out = {}
    for name, b in base.items():
        tau = ft[name].float() - b.float()
        magnitude = tau.abs().reshape(-1)
        n = magnitude.numel()
        keep = torch.zeros(n, dtype=torch.bool)
        if method == "ties":
            keep[torch.argsort(magnitude, descending=True, stable=True)[: max(1, int(0.2 * n))]] = True
        else:
            n_bot, n_keep = band_counts(n, 0.3, 0.05)
            keep[torch.argsort(magnitude, stable=True)[n_bot : n_bot + n_keep]] = True
        out[name] = b.float() + tau * keep.reshape(tau.shape)
    return out


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_index_tie_rule_is_a_stable_sort_whatever_the_chunking(half_family, method, tmp_path, monkeypatch):
    """One model, weight 1: the output is base + the kept task-vector entries, exactly."""
    recipe = RECIPES[method](half_family, tie_rule="index")
    recipe["models"] = recipe["models"][:1]
    recipe["models"][0]["parameters"]["weight"] = 1.0
    recipe["out_dtype"] = "float32"
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    expected = _stable_expected(load_folder(half_family["base"]), load_folder(half_family["ft1"]), method)
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 300)
    for label in ("chunked", "whole"):
        ours = run_deltawise(path, tmp_path / label)
        assert {k for k in expected if not torch.equal(ours[k], expected[k])} == set(), label
        monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 1 << 20)
    # not vacuous: on these checkpoints mergekit's (unstable) order keeps other entries among the ties
    recipe["parameters"]["tie_rule"] = "mergekit"
    other = run_deltawise(write_recipe(tmp_path / "mergekit.yaml", recipe), tmp_path / "mergekit")
    assert any(not torch.equal(other[k], v) for k, v in expected.items())


def test_tie_index_ignores_the_order_chunks_arrive_in():
    from deltawise.merge.thresholds import TieIndex

    gen = torch.Generator().manual_seed(4)
    tau = torch.randint(-9, 10, (30, 20), generator=gen).float() / 64
    magnitudes = tau.abs().reshape(-1)
    n, k = magnitudes.numel(), 150
    kth = float(magnitudes.sort(descending=True).values[k - 1])
    above, equal = int((magnitudes > kth).sum()), int((magnitudes == kth).sum())
    assert equal > k - above > 0  # the boundary splits the ties

    class Job:
        def __init__(self, start: int):
            self.models, self.row_start = [tau[start : start + 4]], start

        def deltas(self):
            return [self.models[0]]

    tie_pass = TieIndex({0: _Window(descending=True, start=0, stop=k, boundaries=(kth,), before=(above,))})
    for start in (28, 4, 16, 0, 24, 8, 12, 20):
        tie_pass.update(Job(start))
    kept = magnitudes > kth
    kept[tie_pass.kept[0]] = True
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.argsort(magnitudes, descending=True, stable=True)[:k]] = True
    assert torch.equal(kept, expected)
