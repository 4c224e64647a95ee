"""continual_ties: FusionBench's continual TIES loop (its own ties_merging functions, read from the
installed fusion-bench files) gives the same models step by step, whatever the row chunking."""

from __future__ import annotations

import pytest
import torch

from test_merge_spectral_methods import fusion_bench_module
from test_mergekit_compat import assert_same_tensors, load_folder

from deltawise.merge import merge


def fusion_bench_continual_ties(states: dict, order: list[str], lam: float, density: float, monkeypatch) -> list[dict]:
    """ContinualTiesMergingForCLIP.run's arithmetic, with fusion-bench's own helpers."""
    fb = fusion_bench_module("method/ties_merging/ties_merging_utils.py", monkeypatch)
    base = states["base"]
    merged, after = None, []
    for i, name in enumerate(order):
        tv = {k: states[name][k] - base[k] for k in base}
        if i == 0:
            update = tv
            merged = dict(base)
        else:
            merged_tv = {k: merged[k] - base[k] for k in base}
            flat = torch.vstack([fb.state_dict_to_vector(merged_tv), fb.state_dict_to_vector(tv)])
            update = fb.vector_to_state_dict(fb.ties_merging(flat, reset_thresh=100 * density, merge_func="sum"), merged_tv)
        merged = {k: merged[k] + lam * update[k] for k in base}
        after.append(merged)
    return after


@pytest.mark.parametrize("chunked", [False, True])
def test_continual_ties_equals_fusion_bench(chunked, llama_family, tmp_path, monkeypatch, capsys):
    if chunked:
        monkeypatch.setattr("deltawise.merge.continual.CHUNK_ELEMENTS", 100)
    order = ["ft1", "ft2", "ft3"]
    ours = []
    for i, name in enumerate(order):
        recipe = {"merge_method": "continual_ties", "base_model": str(llama_family["base"]),
                  "models": [{"model": str(llama_family[name])}],
                  "parameters": {"state": str(tmp_path / "state"), "lambda": 0.5, "density": 0.2}}
        merge(recipe, tmp_path / f"after-{i}")
        ours.append(load_folder(tmp_path / f"after-{i}"))
    states = {n: load_folder(llama_family[n]) for n in ["base", *order]}
    theirs = fusion_bench_continual_ties(states, order, 0.5, 0.2, monkeypatch)
    capsys.readouterr()
    for i, (a, b) in enumerate(zip(theirs, ours)):
        assert_same_tensors({k: v.to(b[k].dtype) for k, v in a.items()}, b, atol=1e-6, rtol=1e-5, label=f"step {i + 1}")


def test_streaming_threshold_is_the_exact_order_statistic(llama_family, tmp_path, monkeypatch):
    """The histogram-and-bin search gives torch.kthvalue over the whole concatenated model."""
    import deltawise.merge.methods.continual_ties as ct

    seen = {}
    real = ct.kth_smallest_magnitudes

    def spy(io, ranks):
        seen["values"] = real(io, ranks)
        seen["ranks"] = ranks
        return seen["values"]

    monkeypatch.setattr(ct, "kth_smallest_magnitudes", spy)
    monkeypatch.setattr("deltawise.merge.continual.CHUNK_ELEMENTS", 64)
    for i, name in enumerate(["ft1", "ft2"]):
        recipe = {"merge_method": "continual_ties", "base_model": str(llama_family["base"]),
                  "models": [{"model": str(llama_family[name])}], "parameters": {"state": str(tmp_path / "s"), "density": 0.3}}
        merge(recipe, tmp_path / f"o{i}")
    base, ft2 = load_folder(llama_family["base"]), load_folder(llama_family["ft2"])
    first = load_folder(tmp_path / "o0")
    names = [k for k in base if base[k].is_floating_point()]
    d = torch.cat([(first[k].float() - base[k].float()).reshape(-1) for k in names]).abs()
    tau = torch.cat([(ft2[k].float() - base[k].float()).reshape(-1) for k in names]).abs()
    rank = seen["ranks"][0]
    assert rank == d.numel() - int(d.numel() * 0.3)
    assert seen["values"] == [float(d.kthvalue(rank).values), float(tau.kthvalue(rank).values)]
