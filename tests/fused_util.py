"""Helpers of the fused-kernel tests (test_fused*.py): quantised inputs, the torch path's job and the fused path's
run on one tensor, and small model families merged with and without the kernels."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import load_state

from deltawise.merge import fused, fused_sparse, merge
from deltawise.merge.base import REGISTRY, TensorJob
from deltawise.merge.fused_sparse import RawChunk

SIZES = [1, 7, 511, 512, 513, 4099]  # around the kernel's 512-entry block
HALF = torch.float16 in fused.DTYPE_CODES  # the compiler had _Float16 (gcc 12+, clang)
DTYPES = [
    ((torch.bfloat16,) * 3, torch.bfloat16, torch.bfloat16),
    ((torch.float32,) * 2, torch.float32, torch.float32),
    ((torch.bfloat16, torch.float32, torch.bfloat16), torch.float32, torch.bfloat16),
] + ([((torch.float16, torch.bfloat16, torch.float32), torch.float16, torch.float16)] if HALF else [])
MODEL_PARAMS = [{"weight": 0.5, "density": 0.3}, {"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.2}]
FAMILY_SHAPES = {"embed.weight": (300, 16), "layer.weight": (48, 40), "layer.bias": (40,), "scale": ()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def quantised_inputs(n: int, dtypes, base_dtype, seed: int = 0, rows: int = 1):
    """Quantised task vectors (many equal magnitudes, so thresholds fall among ties)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, n // rows) if rows > 1 else (n,)
    base = torch.randn(shape, generator=gen).to(base_dtype)
    models = [(base.float() + torch.randint(-12, 13, shape, generator=gen).float() / 256).to(d) for d in dtypes]
    return base, models


def torch_job(method, base, models, params, model_params, seed=0, name="w", row_start=0) -> TensorJob:
    """The torch path's job: inputs as float32 (the engine's compute dtype), passes run on it."""
    job = TensorJob(name, base.float(), [m.float() for m in models], params, model_params, {}, seed, row_start=row_start)
    for stats_pass in method.tensor_passes(params, model_params, models[0].numel(), job.stats):
        stats_pass.update(job)
    return job


def raw_chunk(base, models, seed=0, name="w", row_start=0) -> RawChunk:
    def blame():
        raise AssertionError("non-finite task vector")

    row = models[0][0].numel() if models[0].dim() > 0 else 0
    return RawChunk(name, base.contiguous(), [m.contiguous() for m in models], row_start, row_start * row, blame,
                    seed=seed, shape=tuple(models[0].shape))


def fused_run(method, base, models, params, model_params, out_dtype, seed=0, stats=None):
    """The fused path: passes on the raw chunk where they take one, then the kernel."""
    spec = method.fused(params, model_params)
    chunk = raw_chunk(base, models, seed)
    stats = {} if stats is None else stats
    job = None
    for stats_pass in method.tensor_passes(params, model_params, models[0].numel(), stats):
        if hasattr(stats_pass, "update_raw"):
            stats_pass.update_raw(chunk)
        else:
            job = job or TensorJob("w", base.float(), [m.float() for m in models], params, model_params, stats, seed)
            stats_pass.update(job)
    out = torch.empty(models[0].shape, dtype=out_dtype)
    masks = fused_sparse.keep_masks(chunk, spec.sparse) if spec.sparse.trim in ("random", "della") else None
    assert fused_sparse.run(spec.sparse, out, chunk, stats, masks) == 0
    return out, stats


def method_params(method_name, **given):
    method = REGISTRY[method_name]()
    params = {p.name: given.get(p.name, p.default) for p in method.params if p.scope != "model"}
    return method, params


# ---- through the engine -------------------------------------------------------------------------


def quantised_noise(v: torch.Tensor, i: int, gen: torch.Generator) -> torch.Tensor:
    """Steps of 1/128: many equal magnitudes, so thresholds fall among ties."""
    return torch.randint(-8, 9, v.shape, generator=gen).float() / 128


def fused_family(make_folder, shapes=FAMILY_SHAPES, noise=quantised_noise, nan: bool = False) -> dict[str, Path]:
    """A bfloat16 base and three fine-tunes ``ft1``..``ft3`` (base + ``noise(tensor, i, generator)``), seed 0;
    ``nan``: ft2's embed.weight holds one NaN."""
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen).bfloat16() for k, s in shapes.items()}
    family = {"base": make_folder("base", base)}
    for i in (1, 2, 3):
        tensors = {k: (v.float() + noise(v, i, gen)).to(v.dtype) for k, v in base.items()}
        if nan and i == 2:
            tensors["embed.weight"][123, 4] = float("nan")
        family[f"ft{i}"] = make_folder(f"ft{i}", tensors)
    return family


def count_calls(monkeypatch, module, *names: str) -> list:
    """Wraps ``module.<name>`` for each name; the returned list grows by one entry a call."""
    calls: list = []
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    return calls


def assert_same_bits(folder: Path, reference: Path, label: str = "") -> dict[str, torch.Tensor]:
    """The two outputs hold the same tensor names and the same bits; returns the first one's tensors."""
    a, b = load_state(folder), load_state(reference)
    assert a.keys() == b.keys(), label
    for k in a:
        assert torch.equal(bits(a[k]), bits(b[k])), (label, k) if label else k
    return a


def assert_kernels_change_nothing(recipe: dict, tmp_path: Path, monkeypatch, module=fused_sparse) -> dict:
    """The recipe merged by the fused kernels (``module.run`` called, in several chunks a tensor) and by the
    torch path: the same bits. Returns the fused output's tensors."""
    from deltawise.merge import engine

    calls = count_calls(monkeypatch, module, "run")
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)  # several chunks for the embedding
    merge(recipe, str(tmp_path / "fused"), threads=2)
    assert len(calls) >= 6, "the fused path was not taken"
    monkeypatch.setattr(module, "available", lambda: False)
    merge(recipe, str(tmp_path / "torch"), threads=2)
    return assert_same_bits(tmp_path / "fused", tmp_path / "torch")
