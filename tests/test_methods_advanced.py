"""Consensus (TALL masks) and PCB merging: hand-computed values, the properties stated in
docs/merging.md (consensus, pcb), PCB's whole-model mode against the released algorithm restated on
flattened vectors, and end-to-end merges of a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import load_state
from deltawise.merge import merge
from deltawise.merge import engine as engine_module
from methods_util import run_method
from test_global_topk import flat, write_family


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- consensus ---------------------------------------------------------------------------

def test_consensus_hand_computed():
    base = [1.0, 1.0, 1.0, 1.0]
    t1, t2 = [1.0, 0.0, 2.0, 0.1], [1.0, 3.0, -2.0, 0.0]
    models = [[b + x for b, x in zip(base, t)] for t in (t1, t2)]
    mp = [{"mask_lambda": 0.5}, {"mask_lambda": 0.5}]
    # tau_MTL = [2, 3, 0, 0.1]; m1 = [1, 0, 1, 1], m2 = [1, 1, 1, 0]; count = [2, 1, 2, 1]
    out = run_method("consensus", base, models, {"lambda": 0.5}, mp)
    assert torch.allclose(out, torch.tensor([2.0, 1.0, 1.0, 1.0]))
    out = run_method("consensus", base, models, {"lambda": 0.5, "k": 1}, mp)
    assert torch.allclose(out, torch.tensor([2.0, 2.5, 1.0, 1.05]))
    # per-model lambda_t: lambda_1 = 2 drops entry 0 from m1 (|1| > 2*|1| fails)
    out = run_method("consensus", base, models, {"lambda": 0.5}, [{"mask_lambda": 2.0}, {"mask_lambda": 0.5}])
    assert torch.allclose(out, torch.tensor([1.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_consensus_keeps_an_entry_iff_k_masks_select_it(k):
    base = randn(6, 7, seed=1)
    taus = [randn(6, 7, seed=s) * (0.5 + s) for s in (2, 3, 4)]
    taus[0][0] = 0  # entries no task's mask can select against the others
    lambdas = [0.2, 0.4, 0.6]
    out = run_method("consensus", base, [base + t for t in taus], {"k": k, "lambda": 0.7}, [{"mask_lambda": x} for x in lambdas])
    multi = sum((base + t) - base for t in taus)
    count = sum(((base + t) - base).abs() > lam * (multi - ((base + t) - base)).abs() for t, lam in zip(taus, lambdas))
    assert torch.allclose(out, base + 0.7 * multi * (count >= k), atol=1e-6)
    if k == 0:  # task arithmetic
        assert torch.allclose(out, run_method("task_arithmetic", base, [base + t for t in taus], {"lambda": 0.7}), atol=1e-6)
    if k > 3:  # the base model
        assert torch.equal(out, base)


def test_consensus_single_task_mask_keeps_every_nonzero_entry():
    base, tau = randn(5, 5, seed=5), randn(5, 5, seed=6)
    tau[tau.abs() < 0.5] = 0
    model = base + tau
    out = run_method("consensus", base, [model], {"k": 1}, [{"mask_lambda": 100.0}])
    assert torch.equal(out, base + (model - base))
    assert torch.equal(run_method("consensus", base, [model]), base)  # default k = 2 > T = 1


def test_consensus_ties_hand_computed():
    base = [1.0, 1.0, 1.0, 1.0]
    t1, t2 = [1.0, -0.2, 2.0, 0.5], [-3.0, 0.4, 1.5, 0.1]
    models = [[b + x for b, x in zip(base, t)] for t in (t1, t2)]
    params = {"multi_task": "ties", "lambda": 0.5}
    mp = [{"mask_lambda": 0.5, "density": 0.5}] * 2
    # trim (keep 2 of 4 per tensor): [1, 0, 2, 0], [-3, 0, 1.5, 0]; signs [-, +, +, +];
    # disjoint sum tau_MTL = [-3, 0, 3.5, 0]. Masks (untrimmed tau_t, lambda_t = 0.5):
    # m1 = [F, T, T, T], m2 = [T, T, T, T]  ->  count = [1, 2, 2, 2]
    out = run_method("consensus", base, models, params, mp)
    assert torch.allclose(out, torch.tensor([1.0, 1.0, 2.75, 1.0]))
    out = run_method("consensus", base, models, dict(params, k=1), mp)
    assert torch.allclose(out, torch.tensor([-0.5, 1.0, 2.75, 1.0]))
    # the task-arithmetic tau_MTL = [-2, 0.2, 3.5, 0.6] gives a different result
    out = run_method("consensus", base, models, {"lambda": 0.5, "k": 1}, mp)
    assert not torch.allclose(out, torch.tensor([-0.5, 1.0, 2.75, 1.0]))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_consensus_ties_k0_is_ties_dis_sum_and_large_k_is_base(density):
    base = randn(8, 9, seed=20)
    models = [base + randn(8, 9, seed=s) * 0.1 * s for s in (21, 22, 23)]
    mp = [{"density": density}] * 3
    ties = run_method("ties", base, models, {"lambda": 0.7, "normalize": False}, mp)
    out = run_method("consensus", base, models, {"multi_task": "ties", "k": 0, "lambda": 0.7}, mp)
    assert torch.equal(out, ties)
    assert torch.equal(run_method("consensus", base, models, {"multi_task": "ties", "k": 4}, mp), base)


@pytest.mark.parametrize("k", [0, 2])
def test_consensus_ties_global_matches_flattened_restatement(make_folder, tmp_path, k):
    shapes = {"a.weight": (16, 8), "b.weight": (8, 8), "c.bias": (8,)}
    base, models, (base_path, *model_paths) = write_family(make_folder, shapes, 3)
    params = {"multi_task": "ties", "granularity": "global", "k": k, "lambda": 0.6}
    recipe = {"merge_method": "consensus", "base_model": str(base_path), "models": [{"model": str(p)} for p in model_paths],
              "parameters": params}
    merge(recipe, str(tmp_path / "out"))
    keys = sorted(shapes)
    taus = torch.stack([flat(m, keys) - flat(base, keys) for m in models])
    # official TIES on the flattened model, top-20% and disjoint SUM (official_ties is dis-mean)
    d = taus.shape[1]
    kth = taus.abs().kthvalue(d - int(d * 0.2), dim=1, keepdim=True).values
    trimmed = taus * (taus.abs() >= kth)
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    multi = (trimmed * torch.where(signs > 0, trimmed > 0, trimmed < 0)).sum(dim=0)
    count = sum((t.abs() > 0.4 * (multi - t).abs()).int() for t in taus)
    expected = flat(base, keys) + 0.6 * multi * (count >= k)
    assert torch.allclose(flat(load_state(tmp_path / "out"), keys), expected, atol=1e-6)
    if k == 0:  # equals ties in global mode with the disjoint sum
        ties = dict(recipe, merge_method="ties",
                    parameters={"density": 0.2, "granularity": "global", "normalize": False, "lambda": 0.6})
        merge(ties, str(tmp_path / "ties"))
        for key, v in load_state(tmp_path / "ties").items():
            assert torch.equal(load_state(tmp_path / "out")[key], v), key


# --- PCB ---------------------------------------------------------------------------------

def official_pcb(m: torch.Tensor, ratio: float, clip: float, lam: float = 1.0, weights=None) -> torch.Tensor:
    """The released PCB_merge (pcb-merging.py / task_para_att_merge) on T x d task vectors,
    restated: sort-based clamps, min-max normalise per row, tanh inter term."""
    n, d = m.shape

    def clamp_rows(x, min_ratio, max_ratio):
        s = x.sort(dim=1).values
        return x.clamp(s[:, int(d * min_ratio)].unsqueeze(1), s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))

    def norm(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        span = hi - lo
        return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), 0)

    a = clamp_rows(m.abs(), clip, clip)
    clipped = m.sign() * a
    score = torch.exp(n * norm(a) ** 2) * torch.tanh(m * m.sum(dim=0))
    scale = norm(clamp_rows(score, 1 - ratio, 0))
    if weights is not None:
        clipped = clipped * torch.tensor(weights).unsqueeze(1)
    return lam * (clipped * scale).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)


def test_pcb_hand_computed():
    base = torch.full((4,), 0.5)
    taus = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([1.0, 2.0, -0.5, 1.0])]
    # clip 0, no drop (ratio 1). Task 1: b = [e^0.5 tanh 2, 0, 0, 0] -> b_hat = [1, 0, 0, 0].
    # Task 2: b = [e^(2/9) tanh 2, 0, 0, e^(2/9) tanh 1] -> b_hat = [1, 0, 0, tanh 1 / tanh 2].
    # tau_m = [(1 + 1) / 2, 0, 0, (tanh1/tanh2 * 1) / (tanh1/tanh2)] = [1, 0, 0, 1]
    params = {"ratio": 1.0, "clip_ratio": 0.0, "lambda": 2.0, "granularity": "tensor"}
    out = run_method("pcb", base, [base + t for t in taus], params)
    assert torch.allclose(out, torch.tensor([2.5, 0.5, 0.5, 2.5]), atol=1e-6)
    # ratio 0.5 drops b_2[3] = e^(2/9) tanh 1 (the score at sorted position 2): tau_m = [1, 0, 0, 0]
    out = run_method("pcb", base, [base + t for t in taus], dict(params, ratio=0.5))
    assert torch.allclose(out, torch.tensor([2.5, 0.5, 0.5, 0.5]), atol=1e-6)
    # per-task weights scale M_c[t] only (the vision script's lambda_t)
    out = run_method("pcb", base, [base + t for t in taus], params, [{"weight": 3.0}, {"weight": 1.0}])
    expected_0 = (3.0 * 1 + 1.0 * 1) / 2
    assert math.isclose(float(out[0]), 0.5 + 2 * expected_0, rel_tol=1e-6)


def test_pcb_single_model_keeps_the_clipped_top_entries():
    base, tau = randn(10, 10, seed=7), randn(10, 10, seed=8)
    out = run_method("pcb", base, [base + tau], {"granularity": "tensor"})  # ratio 0.1, clip 0.01
    flat_tau = tau.reshape(-1)
    s = flat_tau.abs().sort().values
    clipped = flat_tau.sign() * flat_tau.abs().clamp(s[1], s[98])
    # T = 1: the score grows with |tau|, so entries above sorted position int(100 * 0.9) = 90 stay
    keep = flat_tau.abs() > s[90]
    assert int(keep.sum()) == 9
    assert torch.allclose((out - base).reshape(-1), clipped * keep, atol=1e-6)
    # no dropping (ratio 1): every entry but the smallest-score one, whose normalised score is 0
    out = run_method("pcb", base, [base + tau], {"granularity": "tensor", "ratio": 1.0, "clip_ratio": 0.0})
    expected = flat_tau.clone()
    expected[flat_tau.abs().argmin()] = 0
    assert torch.allclose((out - base).reshape(-1), expected, atol=1e-6)


@pytest.mark.parametrize("ratio,clip", [(0.1, 0.01), (0.2, 0.0001), (0.05, 0.0)])
def test_pcb_tensor_mode_matches_released_algorithm(ratio, clip):
    base = randn(12, 9, seed=9)
    taus = [randn(12, 9, seed=s) * 0.01 * s for s in (10, 11, 12)]
    out = run_method("pcb", base, [base + t for t in taus],
                     {"ratio": ratio, "clip_ratio": clip, "lambda": 1.3, "granularity": "tensor"})
    m = torch.stack([((base + t) - base).reshape(-1) for t in taus])
    expected = base.reshape(-1) + official_pcb(m, ratio, clip, 1.3)
    assert torch.allclose(out.reshape(-1), expected, atol=1e-6)


def test_pcb_global_matches_released_algorithm_on_the_flattened_model(make_folder, tmp_path, monkeypatch):
    shapes = {"a.weight": (16, 8), "b.weight": (8, 8), "c.bias": (8,), "d.weight": (4, 16)}
    base, models, (base_path, *model_paths) = write_family(make_folder, shapes, 3)
    recipe = {
        "merge_method": "pcb", "base_model": str(base_path),
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(model_paths, (1.0, 1.2, 0.9))],
        "parameters": {"ratio": 0.2, "lambda": 0.8},
    }
    merge(recipe, str(tmp_path / "out"))
    keys = sorted(shapes)
    taus = torch.stack([flat(m, keys) - flat(base, keys) for m in models])
    expected = flat(base, keys) + official_pcb(taus, 0.2, 0.01, 0.8, [1.0, 1.2, 0.9])
    got = flat(load_state(tmp_path / "out"), keys)
    assert torch.allclose(got, expected, atol=1e-6)
    # chunked, threaded runs give the same files
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 16)
    merge(recipe, str(tmp_path / "chunked"), threads=3)
    chunked = load_state(tmp_path / "chunked")
    for k, v in load_state(tmp_path / "out").items():
        assert torch.allclose(chunked[k], v, atol=1e-7), k
    # per tensor differs (the scales differ between tensors)
    merge(dict(recipe, parameters={"ratio": 0.2, "lambda": 0.8, "granularity": "tensor"}), str(tmp_path / "tensor"))
    assert not torch.allclose(flat(load_state(tmp_path / "tensor"), keys), expected, atol=1e-6)


def test_pcb_global_refuses_ratio_varying_by_tensor(make_folder, tmp_path):
    from deltawise.errors import RecipeError

    _, _, (base_path, m0) = write_family(make_folder, {"a.weight": (4, 4), "b.weight": (4, 4)}, 1)
    recipe = {
        "merge_method": "pcb", "base_model": str(base_path), "models": [{"model": str(m0)}],
        "parameters": {"ratio": [{"filter": "a.", "value": 0.5}, {"value": 0.2}]},
    }
    with pytest.raises(RecipeError, match="ratio must be the same"):
        merge(recipe, str(tmp_path / "out"))


def test_pcb_global_refuses_a_model_too_large_for_memory(make_folder, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from deltawise.errors import RecipeError
    from deltawise.merge.methods import pcb

    _, _, (base_path, m0) = write_family(make_folder, {"a.weight": (64, 64)}, 1)
    recipe = {"merge_method": "pcb", "base_model": str(base_path), "models": [{"model": str(m0)}]}
    need = pcb.global_memory_bytes(1, 64 * 64)
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=need - 1))
    with pytest.raises(RecipeError, match="granularity: tensor"):
        merge(recipe, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=need))
    merge(recipe, str(tmp_path / "out"))  # just enough memory: it runs


# --- end to end on a tiny Llama ------------------------------------------------------------

@pytest.mark.parametrize("method,params", [
    ("consensus", {"k": 2, "lambda": 0.5}),
    ("consensus", {"k": 1, "lambda": 0.5, "multi_task": "ties"}),
    ("pcb", {"ratio": 0.1}),
    ("pcb", {"ratio": 0.2, "granularity": "tensor"}),
])
def test_end_to_end_llama_merge_loads_in_transformers(llama_family, tmp_path, method, params):
    from transformers import AutoModelForCausalLM

    recipe = {
        "merge_method": method, "base_model": str(llama_family["base"]),
        "models": [{"model": str(llama_family[m])} for m in ("ft1", "ft2", "ft3")], "parameters": params,
    }
    merge(recipe, str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = load_state(llama_family["base"])
    out = load_state(tmp_path / "out")
    changed = [k for k in base if base[k].is_floating_point() and not torch.equal(base[k], out[k])]
    assert changed
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
