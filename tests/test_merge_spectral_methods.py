"""TSV-M, Iso-C and Iso-CTS: the same tensors as FusionBench's implementations on the same state
dicts (the functions of the installed ``fusion-bench`` package, read from its files), whatever the
row chunking, plus the properties each method promises."""

from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from test_mergekit_compat import assert_same_tensors, load_folder

from deltawise.merge import merge, merge_state_dicts
from deltawise.merge.methods.iso import iso_c_merge, iso_cts_merge
from deltawise.merge.methods.tsv import tsv_merge


def fusion_bench_module(relative: str, monkeypatch) -> types.ModuleType:
    """One file of fusion-bench, executed on its own: the package's __init__ imports Lightning,
    Hydra and more, which these functions don't use; the two helpers they import are stubbed."""
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fusion-bench is not installed (scripts/setup test installs it)")
    path = Path(spec.submodule_search_locations[0]) / relative
    utils = types.ModuleType("fusion_bench.utils")
    utils.timeit_context = lambda *a, **k: nullcontext()
    typing_stub = types.ModuleType("fusion_bench.utils.type")
    typing_stub.StateDictType = dict
    package = types.ModuleType("fusion_bench")
    package.__path__ = []
    for name, module in {"fusion_bench": package, "fusion_bench.utils": utils, "fusion_bench.utils.type": typing_stub}.items():
        monkeypatch.setitem(sys.modules, name, module)
    module_spec = importlib.util.spec_from_file_location(f"fb_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def task_vectors(states: dict[str, dict], names: list[str]) -> list[dict[str, torch.Tensor]]:
    return [{k: states[n][k] - states["base"][k] for k in states["base"]} for n in names]


def fusion_bench_merged(kind: str, states, names, monkeypatch, scale: float, fraction: float = 0.8):
    tvs = task_vectors(states, names)
    if kind == "tsv":
        fb = fusion_bench_module("method/task_singular_vector/utils/TSVM_utils.py", monkeypatch)
        merged = fb.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
    else:
        fb = fusion_bench_module("method/isotropic_merging/iso_utils.py", monkeypatch)
        merged = fb.iso_c(tvs, accelerator="cpu") if kind == "iso_c" else fb.iso_cts(tvs, fraction, accelerator="cpu")
    return {k: states["base"][k] + scale * merged[k] for k in states["base"]}


CASES = {
    "tsv": ("tsv", {"lambda": 1.0}),
    "tsv-scaled": ("tsv", {"lambda": 0.7}),
    "iso_c": ("iso_c", {"lambda": 1.3}),
    "iso_cts": ("iso_cts", {"lambda": 1.0}),
    "iso_cts-half": ("iso_cts", {"lambda": 1.0, "common_space_fraction": 0.5}),
}


@pytest.mark.parametrize("case, chunked", [(c, False) for c in CASES] + [("tsv", True), ("iso_cts", True)])
def test_same_tensors_as_fusion_bench(case, chunked, llama_family, tmp_path, monkeypatch, capsys):
    method, params = CASES[case]
    if chunked:
        monkeypatch.setattr("deltawise.merge.engine.CHUNK_ELEMENTS", 100)  # several row chunks per matrix
    names = ["ft1", "ft2", "ft3"]
    recipe = {"merge_method": method, "base_model": str(llama_family["base"]), "parameters": params,
              "models": [{"model": str(llama_family[n])} for n in names]}
    merge(recipe, tmp_path / "out")
    ours = load_folder(tmp_path / "out")
    states = {n: load_folder(llama_family[n]) for n in ["base", *names]}
    theirs = fusion_bench_merged(method, states, names, monkeypatch, params["lambda"],
                                 params.get("common_space_fraction", 0.8))
    capsys.readouterr()  # fusion-bench prints a line per tensor
    theirs = {k: v.to(ours[k].dtype) for k, v in theirs.items()}
    assert_same_tensors(theirs, ours, atol=1e-5, rtol=1e-5, label=case)
    # the in-memory API runs the same method code
    in_memory = merge_state_dicts(states, method, parameters=params, base="base")
    assert_same_tensors(ours, in_memory, atol=1e-6, rtol=1e-6, label=f"{case} in memory")


def orthogonal_pieces(seed: int, shape: tuple[int, int], count: int, rank: int) -> list[torch.Tensor]:
    """Task vectors of rank ``rank`` whose row and column spaces are mutually orthogonal."""
    gen = torch.Generator().manual_seed(seed)
    q_left, _ = torch.linalg.qr(torch.randn(shape[0], count * rank, generator=gen, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(shape[1], count * rank, generator=gen, dtype=torch.float64))
    pieces = []
    for t in range(count):
        cols = slice(t * rank, (t + 1) * rank)
        s = torch.diag(torch.rand(rank, generator=gen, dtype=torch.float64) + 0.5)
        pieces.append(q_left[:, cols] @ s @ q_right[:, cols].T)
    return pieces


def test_tsv_of_orthogonal_low_rank_tasks_is_their_sum():
    """Nothing to decorrelate: when each task's directions are orthogonal to the others' and fit in
    its k = min(m, n) / T kept directions exactly, TSV-M is task arithmetic. (With fewer, the
    kept null directions are arbitrary and whitening rotates the others: the method assumes
    every task fills its share.)"""
    pieces = orthogonal_pieces(0, shape=(24, 16), count=3, rank=5)  # k = 16 // 3 = 5
    torch.testing.assert_close(tsv_merge(pieces), sum(pieces), atol=1e-10, rtol=1e-10)


def test_tsv_keeps_each_tasks_top_directions_only():
    """A direction a task holds beyond its k kept ones is dropped."""
    gen = torch.Generator().manual_seed(1)
    big = orthogonal_pieces(2, shape=(12, 8), count=2, rank=4)  # k = 8 // 2 = 4 per task: all kept
    extra = torch.randn(12, 1, generator=gen, dtype=torch.float64) @ torch.randn(1, 8, generator=gen, dtype=torch.float64)
    tiny = 1e-3 * extra / extra.norm()
    merged = tsv_merge([big[0] + tiny, big[1]])
    assert torch.linalg.matrix_rank(merged, atol=1e-8) <= 8
    assert (merged - (big[0] + big[1])).norm() < 2e-3  # only the small extra direction is changed


def test_iso_c_flattens_the_spectrum_of_the_sum():
    gen = torch.Generator().manual_seed(3)
    deltas = [torch.randn(20, 12, generator=gen, dtype=torch.float64) for _ in range(3)]
    merged = iso_c_merge(deltas)
    s_sum = torch.linalg.svdvals(sum(deltas))
    s_merged = torch.linalg.svdvals(merged)
    torch.testing.assert_close(s_merged, torch.full_like(s_merged, float(s_sum.mean())))
    # same singular subspaces as the sum: projecting the sum onto merged's column space changes nothing
    u, _, _ = torch.linalg.svd(merged, full_matrices=False)
    torch.testing.assert_close(u @ (u.T @ sum(deltas)), sum(deltas))


def test_iso_cts_flat_spectrum_and_common_subspace_kept():
    gen = torch.Generator().manual_seed(4)
    deltas = [torch.randn(30, 20, generator=gen, dtype=torch.float64) for _ in range(4)]
    merged = iso_cts_merge(deltas, 0.6)
    s_merged = torch.linalg.svdvals(merged)
    assert torch.allclose(s_merged, s_merged[0].expand_as(s_merged))
    # r = 20, common = 20 - 4 * round((20 - 12) / 4) = 12: the top 12 directions of the sum are in the span
    u_sum, _, _ = torch.linalg.svd(sum(deltas), full_matrices=False)
    u, _, _ = torch.linalg.svd(merged, full_matrices=False)
    common = u_sum[:, :12]
    torch.testing.assert_close(u @ (u.T @ common), common)


def test_iso_cts_with_all_rank_common_is_iso_c():
    gen = torch.Generator().manual_seed(5)
    deltas = [torch.randn(16, 10, generator=gen, dtype=torch.float64) for _ in range(2)]
    torch.testing.assert_close(iso_cts_merge(deltas, 1.0), iso_c_merge(deltas))


def test_tsv_needs_two_models(llama_family, tmp_path):
    from deltawise.errors import RecipeError

    recipe = {"merge_method": "tsv", "base_model": str(llama_family["base"]), "models": [{"model": str(llama_family["ft1"])}]}
    with pytest.raises(RecipeError, match="tsv"):
        merge(recipe, tmp_path / "out")
