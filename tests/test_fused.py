"""The fused C kernels of linear and task_arithmetic: the same bits as the torch path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_state
from deltawise.errors import DeltawiseError, InputError
from deltawise.merge import fused, merge
from deltawise.merge.methods.linear import weighted_average, weighted_sum
from deltawise.merge.sparsify import combine
from fused_util import HALF, SIZES, assert_kernels_change_nothing, bits, fused_family

if not fused.available():
    if shutil.which("cc") or shutil.which("gcc"):
        pytest.fail("deltawise._fused was not built although a C compiler is present; reinstall with pip install -e .",
                    pytrace=False)
    pytest.skip("deltawise._fused is not built (no C compiler at install time)", allow_module_level=True)

needs_half = pytest.mark.skipif(not HALF, reason="deltawise._fused was built without float16")


def _linear_ref(models, weights, normalize, out_dtype):
    as_float = [m.float() for m in models]
    result = weighted_average(as_float, weights) if normalize else weighted_sum(as_float, weights)
    return result.to(out_dtype)


def _ta_ref(base, models, weights, normalize, scale, out_dtype):
    b = base.float()
    w = torch.tensor(weights, dtype=torch.float32)
    return combine(b, [m.float() - b for m in models], w, consensus=None, normalize=normalize, scale=scale).to(out_dtype)


def _models(n, dtypes, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    return base, [(base + 0.05 * (k + 1) * torch.randn(n, generator=gen)).to(d) for k, d in enumerate(dtypes)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtypes,out_dtype", [
    ((torch.bfloat16,) * 3, torch.bfloat16),
    ((torch.float32,) * 3, torch.float32),
    ((torch.bfloat16, torch.float32, torch.bfloat16), torch.bfloat16),
    ((torch.float32, torch.bfloat16), torch.float32),
    pytest.param((torch.float16,) * 3, torch.float16, marks=needs_half),
    pytest.param((torch.float16, torch.bfloat16, torch.float32), torch.float16, marks=needs_half),
])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_kernel_matches_the_torch_path_bit_for_bit(n, dtypes, out_dtype, normalize):
    _, models = _models(n, dtypes, seed=n)
    weights = [0.3, 0.45, 0.7][: len(models)]
    out = torch.empty(n, dtype=out_dtype)
    spec = fused.FusedSpec("linear", tuple(weights), sum(weights) if normalize else None)
    assert fused.run(spec, out, models) == 0
    assert torch.equal(bits(out), bits(_linear_ref(models, weights, normalize, out_dtype)))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtypes,out_dtype", [
    ((torch.bfloat16,) * 3, torch.bfloat16),
    ((torch.float32,) * 3, torch.float32),
    ((torch.float32, torch.bfloat16), torch.bfloat16),
    pytest.param((torch.float16,) * 3, torch.float16, marks=needs_half),
])
@pytest.mark.parametrize("normalize,scale", [(False, 1.0), (True, 0.7), (False, 0.35), (True, 1.0)])
def test_task_arithmetic_kernel_matches_the_torch_path_bit_for_bit(n, dtypes, out_dtype, normalize, scale):
    base, models = _models(n, dtypes, seed=100 + n)
    base = base.to(out_dtype)
    weights = [0.3, 0.45, 0.7][: len(models)]
    w32 = torch.tensor(weights, dtype=torch.float32).tolist()  # what the method's spec holds
    out = torch.empty(n, dtype=out_dtype)
    spec = fused.FusedSpec("task_arithmetic", tuple(w32), sum(w32) if normalize else None, scale)
    assert fused.run(spec, out, models, base) == 0
    assert torch.equal(bits(out), bits(_ta_ref(base, models, weights, normalize, scale, out_dtype)))


def test_hand_computed_results():
    a = torch.tensor([1.0, 3.0, -2.0, 0.5], dtype=torch.bfloat16)
    b = torch.tensor([3.0, 5.0, 2.0, 0.25], dtype=torch.bfloat16)
    out = torch.empty(4, dtype=torch.bfloat16)
    fused.run(fused.FusedSpec("linear", (1.0, 3.0), 4.0), out, [a, b])  # (a + 3b) / 4
    assert out.tolist() == [2.5, 4.5, 1.0, 0.3125]
    base = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.bfloat16)
    fused.run(fused.FusedSpec("task_arithmetic", (1.0, -1.0), None, 0.5), out, [a, b], base)  # 1 + (a - b) / 2
    assert out.tolist() == [0.0, 0.0, -1.0, 1.125]
    # float32 -> bfloat16 rounds to nearest, ties to even: 1 + 2^-8 is halfway between two bf16
    one = torch.tensor([1.0, 1.0], dtype=torch.float32)
    step = torch.tensor([2.0**-8, 3 * 2.0**-8], dtype=torch.float32)
    fused.run(fused.FusedSpec("linear", (1.0, 1.0)), out[:2], [one, step])
    assert out[:2].tolist() == [1.0, 1.015625]  # 1.00390625 -> 1 (even), 1.01171875 -> 1 + 2^-6


@needs_half
def test_float16_rounding_and_overflow():
    one = torch.ones(3, dtype=torch.float32)
    step = torch.tensor([2.0**-11, 3 * 2.0**-11, 70000.0], dtype=torch.float32)
    out = torch.empty(3, dtype=torch.float16)
    # 1 + 2^-11 is halfway between two float16 values: ties to even; 70001 is past float16's range
    assert fused.run(fused.FusedSpec("linear", (1.0, 1.0)), out, [one, step]) == 1
    assert out[:2].tolist() == [1.0, 1.001953125] and out[2].item() == float("inf")
    assert torch.equal(bits(out[:2]), bits((one + step)[:2].half()))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, pytest.param(torch.float16, marks=needs_half)])
def test_the_nonfinite_count_is_that_of_the_stored_output(out_dtype):
    # float32 bit patterns on both sides of where each dtype's rounding reaches infinity
    limits = [0x477FF000, 0x7F7F8000, 0x7F800000]  # float16, bfloat16, float32
    patterns = [b + d for b in limits for d in (-1, 0, 1)] + [0x3F800000, 0x7FC00000, 0x00000001]
    x = torch.tensor(patterns + [b | -0x80000000 for b in patterns], dtype=torch.int64).to(torch.int32).view(torch.float32)
    out = torch.empty(len(x), dtype=out_dtype)
    bad = fused.run(fused.FusedSpec("linear", (1.0,)), out, [x])
    ref = x.to(out_dtype)
    assert bad == int((~torch.isfinite(ref)).sum()) > 0
    same = ~torch.isnan(ref)  # NaN payloads may differ
    assert torch.equal(bits(out)[same], bits(ref)[same]) and torch.isnan(out[~same]).all()


def test_properties_one_model_and_constant_tensors():
    x = torch.randn(1000).bfloat16()
    out = torch.empty_like(x)
    fused.run(fused.FusedSpec("linear", (1.0,), 1.0), out, [x])
    assert torch.equal(bits(out), bits(x))  # merging one model returns it
    c = torch.full((1000,), 0.8125, dtype=torch.bfloat16)
    fused.run(fused.FusedSpec("linear", (0.25, 0.25, 0.5)), out, [c, c, c])
    assert torch.equal(out, c)  # weights summing to one keep a constant tensor
    fused.run(fused.FusedSpec("task_arithmetic", (0.7, 0.3)), out, [x, x], x)
    assert torch.equal(bits(out), bits(x))  # no task vector: the base comes back


def test_nonfinite_results_are_counted():
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0], dtype=torch.bfloat16)
    b = torch.ones(4, dtype=torch.bfloat16)
    out = torch.empty(4, dtype=torch.bfloat16)
    assert fused.run(fused.FusedSpec("linear", (1.0, 1.0)), out, [a, b]) == 2
    big = torch.full((3,), 3e38, dtype=torch.float32)  # finite inputs, overflowing sum
    assert fused.run(fused.FusedSpec("linear", (1.0, 1.0)), torch.empty(3), [big, big]) == 3
    edge = torch.full((2,), 3.4e38, dtype=torch.float32)  # finite in float32, rounds up to inf in bfloat16
    assert fused.run(fused.FusedSpec("linear", (1.0,)), torch.empty(2, dtype=torch.bfloat16), [edge]) == 2


def test_bad_arguments_are_refused():
    from deltawise import _fused

    out = torch.empty(8, dtype=torch.bfloat16)
    raw = fused._raw
    with pytest.raises(ValueError, match="same length"):
        _fused.linear(raw(out), 1, [raw(out)], [1, 1], [1.0], None)
    with pytest.raises(ValueError, match="dtype code"):
        _fused.linear(raw(out), 1, [raw(out)], [5], [1.0], None)
    with pytest.raises(ValueError, match="bytes"):
        _fused.linear(raw(out), 1, [raw(out[:4])], [1], [1.0], None)
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        fused.run(fused.FusedSpec("linear", (1.0,)), out, [torch.empty(16, dtype=torch.bfloat16)[::2]])


def test_kernel_path_follows_the_environment():
    from deltawise import _fused

    if os.environ.get("DELTAWISE_FUSED_NO_SIMD"):
        assert _fused.path == "baseline"
    else:
        assert _fused.path in ("avx2+fma", "baseline")


def test_the_baseline_copy_of_the_kernels_gives_the_same_bits():
    """On x86-64 the AVX2+FMA copy normally runs; CPUs without it take the baseline copy."""
    if os.environ.get("DELTAWISE_FUSED_NO_SIMD"):
        pytest.skip("this run is the baseline run")
    env = dict(os.environ, DELTAWISE_FUSED_NO_SIMD="1")
    selected = "bit_for_bit or hand_computed or properties or nonfinite or float16_rounding or path_follows"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selected],
                         cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


# ---- through the engine ------------------------------------------------------------------------


def _bf16_family(make_folder):
    """Gaussian fine-tunes, ft_i = base + 0.02 i N(0, 1)."""
    return fused_family(make_folder, noise=lambda v, i, gen: 0.02 * i * torch.randn(v.shape, generator=gen))


def _recipe(method, family, params):
    r = {"merge_method": method, "models": [{"model": str(family[m]), "parameters": {"weight": w}}
                                            for m, w in (("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.9))],
         "parameters": params}
    if method == "task_arithmetic":
        r["base_model"] = str(family["base"])
    return r


@pytest.mark.parametrize("method,params", [
    ("linear", {}), ("linear", {"normalize": False}),
    ("task_arithmetic", {"lambda": 0.8}), ("task_arithmetic", {"normalize": True}),
])
def test_engine_output_is_the_same_with_and_without_the_kernels(make_folder, tmp_path, monkeypatch, method, params):
    family = _bf16_family(make_folder)
    out = assert_kernels_change_nothing(_recipe(method, family, params), tmp_path, monkeypatch, module=fused)
    assert all(t.dtype == torch.bfloat16 for t in out.values())


def test_float64_inputs_take_the_torch_path(make_folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "run", lambda *a, **k: calls.append(1))
    x = torch.randn(20, 4)
    c = make_folder("c", {"w": x.double()})
    d = make_folder("d", {"w": (x + 1).double()})
    merge({"merge_method": "linear", "models": [{"model": str(c)}, {"model": str(d)}]}, str(tmp_path / "out_d"))
    assert not calls
    assert torch.equal(load_state(tmp_path / "out_d")["w"], (x.double() + (x + 1).double()) / 2)


@needs_half
def test_float16_models_merge_the_same_with_and_without_the_kernels(make_folder, tmp_path, monkeypatch):
    x = torch.randn(200, 24)
    a, b = make_folder("a", {"w": x.half()}), make_folder("b", {"w": (x * 0.7 + 0.1).half()})
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                                                   {"model": str(b), "parameters": {"weight": 0.6}}]}
    merge(recipe, str(tmp_path / "fused"))
    monkeypatch.setattr(fused, "available", lambda: False)
    merge(recipe, str(tmp_path / "torch"))
    got, ref = load_state(tmp_path / "fused")["w"], load_state(tmp_path / "torch")["w"]
    assert got.dtype == torch.float16 and torch.equal(bits(got), bits(ref))


@pytest.mark.parametrize("kernels", [True, False])
def test_a_result_beyond_float16_range_is_refused_on_both_paths(make_folder, tmp_path, monkeypatch, kernels):
    if kernels and not HALF:
        pytest.skip("deltawise._fused was built without float16")
    if not kernels:
        monkeypatch.setattr(fused, "available", lambda: False)
    x = torch.full((8, 4), 40000.0).half()  # finite in float16; their sum (80000) is not
    a, b = make_folder("a", {"w": x}), make_folder("b", {"w": x})
    recipe = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"normalize": False}}
    with pytest.raises(DeltawiseError, match=r"NaN/inf for w \(output dtype float16\)"):
        merge(recipe, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_nan_input_is_named_on_the_fused_path(make_folder, tmp_path):
    x = torch.randn(30, 8).bfloat16()
    bad = x.clone()
    bad[3, 4] = float("nan")
    a, b = make_folder("a", {"w": x}), make_folder("b", {"w": bad})
    with pytest.raises(InputError, match=r"'w' contains NaN"):
        merge({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
