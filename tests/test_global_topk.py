"""Whole-model (global) thresholds: exact order statistics, and TIES/Breadcrumbs in global mode
against a direct transcription of the official flattened-model algorithm."""

from __future__ import annotations

import pytest
import torch

from conftest import load_state
from deltawise.merge import merge
from deltawise.merge.base import TensorJob
from deltawise.merge.stats import OrderStatistics


def run_passes(order: OrderStatistics, chunks: list[list[torch.Tensor]]) -> None:
    for stats_pass in order.passes():
        for models in chunks:
            stats_pass.update(TensorJob("x", None, models, {}, [{}] * len(models)))


@pytest.mark.parametrize("dtype_values", ["random", "duplicates"])
def test_order_statistics_are_exact(dtype_values):
    gen = torch.Generator().manual_seed(0)
    if dtype_values == "random":
        pieces = [torch.randn(n, generator=gen) * 10 ** float(torch.randint(-4, 3, (1,), generator=gen))
                  for n in (1000, 37, 5000)]
    else:  # many exact ties and zeros, as bf16 deltas have
        pieces = [torch.randint(-5, 6, (n,), generator=gen).float() / 4 for n in (800, 1200)]
    flat = torch.cat(pieces).abs().sort().values
    ranks = [1, 2, len(flat) // 3, len(flat) - 1, len(flat)]
    order = OrderStatistics(lambda job: job.models, [ranks, [None, 5]])
    run_passes(order, [[p, p] for p in pieces])
    assert order.values[0] == [float(flat[r - 1]) for r in ranks]
    assert order.values[1] == [None, float(flat[4])]


# --- the official TIES code (prateeky2806/ties-merging, merge_utils.py), restated on flat vectors
def official_ties(flat_taus: torch.Tensor, density: float, lam: float) -> torch.Tensor:
    n, d = flat_taus.shape
    k = d - int(d * density)
    kth = flat_taus.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = flat_taus * (flat_taus.abs() >= kth)
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    keep = torch.where(signs.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    count = (selected != 0).sum(dim=0).float()
    return lam * selected.sum(dim=0) / count.clamp(min=1)


def write_family(make_folder, shapes: dict[str, tuple], n_models: int, seed: int = 0, cancel: bool = False):
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    models = []
    for i in range(n_models):
        # scales differ per tensor so a per-tensor and a global threshold disagree
        models.append({k: v + torch.randn(v.shape, generator=gen) * (0.01 * (j + 1)) for j, (k, v) in enumerate(base.items())})
    if cancel:  # an exact cancellation at the largest entry: elected sign comes from the model-wide majority
        first = next(iter(shapes))
        models[1][first].view(-1)[0] = base[first].view(-1)[0] - (models[0][first].view(-1)[0] - base[first].view(-1)[0])
        models[0][first].view(-1)[0] += 5.0
        models[1][first].view(-1)[0] -= 5.0
    paths = [make_folder("base", base)] + [make_folder(f"m{i}", m) for i, m in enumerate(models)]
    return base, models, paths


def flat(state: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1) for k in keys])


@pytest.mark.parametrize("cancel", [False, True])
def test_ties_global_matches_official_code(make_folder, tmp_path, cancel):
    shapes = {"a.weight": (16, 8), "b.weight": (8, 8), "c.bias": (8,), "d.weight": (4, 16)}
    base, models, (base_path, *model_paths) = write_family(make_folder, shapes, 3, cancel=cancel)
    recipe = {
        "merge_method": "ties", "base_model": str(base_path),
        "models": [{"model": str(p)} for p in model_paths],
        "parameters": {"density": 0.2, "lambda": 0.8, "granularity": "global"},
    }
    merge(recipe, str(tmp_path / "out"))
    keys = sorted(shapes)
    taus = torch.stack([flat(m, keys) - flat(base, keys) for m in models])
    expected = flat(base, keys) + official_ties(taus, 0.2, 0.8)
    got = flat(load_state(tmp_path / "out"), keys)
    assert torch.allclose(got, expected, atol=1e-6)
    per_tensor = dict(recipe, parameters={"density": 0.2, "lambda": 0.8})
    merge(per_tensor, str(tmp_path / "out_tensor"))
    assert not torch.allclose(flat(load_state(tmp_path / "out_tensor"), keys), expected, atol=1e-6)


def test_breadcrumbs_global_keeps_the_whole_model_band(make_folder, tmp_path):
    shapes = {"a.weight": (32, 8), "b.weight": (16, 4)}
    base, (model,), (base_path, model_path) = write_family(make_folder, shapes, 1)
    recipe = {
        "merge_method": "breadcrumbs", "base_model": str(base_path), "models": [{"model": str(model_path)}],
        "parameters": {"density": 0.3, "gamma": 0.05, "granularity": "global"},
    }
    merge(recipe, str(tmp_path / "out"))
    keys = sorted(shapes)
    tau = flat(model, keys) - flat(base, keys)
    d = tau.numel()
    order = tau.abs().argsort(descending=True)
    n_top, n_keep = int(0.05 * d), int(0.3 * d)
    keep = torch.zeros(d, dtype=torch.bool)
    keep[order[n_top:n_top + n_keep]] = True
    got = flat(load_state(tmp_path / "out"), keys) - flat(base, keys)
    assert torch.allclose(got, tau * keep, atol=1e-6)


def test_global_mode_refuses_density_varying_by_tensor(make_folder, tmp_path):
    from deltawise.errors import RecipeError

    _, _, (base_path, m0) = write_family(make_folder, {"a.weight": (4, 4), "b.weight": (4, 4)}, 1)
    recipe = {
        "merge_method": "ties", "base_model": str(base_path), "models": [{"model": str(m0)}],
        "parameters": {"granularity": "global", "density": [{"filter": "a.", "value": 0.5}, {"value": 0.2}]},
    }
    with pytest.raises(RecipeError, match="density must not vary"):
        merge(recipe, str(tmp_path / "out"))
