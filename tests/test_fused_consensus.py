"""Consensus merging on the fused kernels (TALL masks in ``sparse_merge``): the torch path's bits."""

from __future__ import annotations

import pytest
import torch

from deltawise.errors import InputError
from deltawise.merge import fused_sparse, merge
from fused_util import (DTYPES, assert_kernels_change_nothing, bits, fused_family, fused_run, method_params,
                        quantised_inputs, torch_job)

if not fused_sparse.available():
    pytest.skip("deltawise._fused is not built (no C compiler at install time)", allow_module_level=True)

MODEL_PARAMS = [{"mask_lambda": 0.4, "density": 0.3}, {"mask_lambda": 0.3, "density": 0.5},
                {"mask_lambda": 0.6, "density": 0.2}]


@pytest.mark.parametrize("n", [1, 7, 511, 512, 513, 4099])
@pytest.mark.parametrize("dtypes,base_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("extra", [
    {}, {"k": 1}, {"k": 3, "lambda": 0.8}, {"k": 0}, {"multi_task": "ties"},
    {"multi_task": "ties", "tie_rule": "index", "k": 1}, {"multi_task": "ties", "tie_rule": "all", "lambda": 1.3},
])
def test_consensus_kernel_matches_the_torch_path(n, dtypes, base_dtype, out_dtype, extra):
    base, models = quantised_inputs(n, dtypes, base_dtype, seed=n)
    method, params = method_params("consensus", **extra)
    model_params = MODEL_PARAMS[: len(models)]
    job = torch_job(method, base, models, params, model_params)
    ours, _ = fused_run(method, base, models, params, model_params, out_dtype)
    assert torch.equal(bits(ours), bits(method.merge(job).to(out_dtype)))


@pytest.mark.parametrize("k,expected", [(2, [2.0, 0.25, 0.0, 0.0]), (1, [2.0, 0.25, -0.8, 0.1]), (3, [0.0] * 4)])
def test_hand_computed_consensus(k, expected):
    """tau_1 = [1, 0.5, -1, 0.1], tau_2 = [1, -0.25, 0.2, 0]: tau_MTL = [2, 0.25, -0.8, 0.1]; lambda 0.4:
    m_1 = |tau_1| > 0.4 |tau_MTL - tau_1| = [1 > 0.4, 0.5 > 0.1, 1 > 0.08, 0.1 > 0] = all selected,
    m_2 = [1 > 0.4, 0.25 > 0.2, 0.2 > 0.4, 0 > 0.04] = the first two: counts [2, 2, 1, 1]."""
    base = torch.zeros(4)
    models = [torch.tensor([1.0, 0.5, -1.0, 0.1]), torch.tensor([1.0, -0.25, 0.2, 0.0])]
    method, params = method_params("consensus", k=k)
    ours, _ = fused_run(method, base, models, params, [{"mask_lambda": 0.4}] * 2, torch.float32)
    assert torch.allclose(ours, torch.tensor(expected))
    assert (bits(ours)[torch.tensor(expected) == 0] == 0).all()  # dropped entries are +0, as masked_fill_


def test_consensus_with_k_zero_is_task_arithmetic():
    """Property: every entry passes k = 0, so the output is theta_0 + lambda * sum_t tau_t, operation for operation."""
    base, models = quantised_inputs(4099, (torch.bfloat16,) * 3, torch.bfloat16, seed=2)
    method, params = method_params("consensus", k=0, **{"lambda": 0.7})
    ours, _ = fused_run(method, base, models, params, MODEL_PARAMS, torch.float32)
    deltas = [m.float() - base.float() for m in models]
    expected = (deltas[0] + deltas[1] + deltas[2]).mul_(0.7).add_(base.float())
    assert torch.equal(bits(ours), bits(expected))


@pytest.mark.parametrize("params", [
    {}, {"k": 1, "lambda": 0.9}, {"multi_task": "ties"}, {"multi_task": "ties", "granularity": "global"},
])
def test_engine_consensus_is_the_same_with_and_without_the_kernels(make_folder, tmp_path, monkeypatch, params):
    family = fused_family(make_folder)
    recipe = {"merge_method": "consensus", "base_model": str(family["base"]),
              "models": [{"model": str(family[m]), "parameters": {"mask_lambda": lam, "density": d}}
                         for m, lam, d in (("ft1", 0.4, 0.3), ("ft2", 0.3, 0.5), ("ft3", 0.5, 0.2))],
              "parameters": params}
    assert_kernels_change_nothing(recipe, tmp_path, monkeypatch)


@pytest.mark.parametrize("method,params", [
    ("consensus", {"k": 2}), ("dare_ties", {"density": 0.5}), ("dare_linear", {"density": 0.5, "rescale": False}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
])
def test_a_non_finite_input_is_named_on_the_fused_path(make_folder, tmp_path, method, params):
    """A NaN task-vector entry that a mask, the TALL selection or the sign election would hide from the output
    is still refused, naming the input, as the torch path's input screen does."""
    family = fused_family(make_folder, nan=True)
    recipe = {"merge_method": method, "base_model": str(family["base"]), "seed": 1,
              "models": [{"model": str(family[m]), "parameters": dict(params) if method != "consensus" else {}}
                         for m in ("ft1", "ft2", "ft3")],
              "parameters": params if method == "consensus" else {}}
    with pytest.raises(InputError, match="ft2.*NaN or infinite"):
        merge(recipe, str(tmp_path / "out"), threads=1)
