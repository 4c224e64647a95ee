"""ComPEFT, top-k and TALL compression against hand-computed results; sizes on disk."""

from __future__ import annotations

import json

import pytest
import torch

from deltawise.delta.apply import apply_delta
from deltawise.delta.compress import compress_delta, topk_mask
from deltawise.delta.extract import extract_delta
from deltawise.delta.store import DeltaFile, DeltaWriter
from deltawise.delta.dense import DenseDelta
from deltawise.delta.tall_compress import compress_tall
from deltawise.errors import DeltawiseError
from conftest import load_state, tree_digest


def write_dense(folder, tensors: dict[str, torch.Tensor], fingerprint="same"):
    with DeltaWriter(folder, {"method": "test", "base": {"ref": "b", "fingerprint": fingerprint}}, []) as w:
        for name, t in tensors.items():
            w.add(name, DenseDelta(t), torch.float32)
        w.finish()
    return folder


def test_topk_helper_follows_methods_md():
    v = torch.tensor([0.1, -0.5, 0.3, -0.3, 0.05])
    assert topk_mask(v, 1.0).all()
    # d=5, k=0.4: int(2.0)=2 kept, n_drop=3, threshold = 3rd smallest |v| = 0.3 -> ties at 0.3 both survive
    assert topk_mask(v, 0.4).tolist() == [False, True, True, True, False]


def test_compeft_density_one_reproduces_sign_times_scale(tmp_path):
    g = torch.Generator().manual_seed(0)
    signs = torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)[torch.randperm(64, generator=g)].reshape(8, 8)
    c = 0.037
    write_dense(tmp_path / "d", {"w": c * signs})
    compress_delta(str(tmp_path / "d"), tmp_path / "c", density=1.0, alpha=1.0)
    got = DeltaFile(tmp_path / "c").get("w")
    assert got.kind == "ternary" and got.scale == pytest.approx(c, rel=1e-6)  # balanced signs: population std = c
    torch.testing.assert_close(got.materialize(), c * signs, rtol=1e-6, atol=0)
    # any residual: with alpha = c / std, density 1 gives exactly c * sgn(residual)
    tau = torch.randn(8, 8, generator=g)
    write_dense(tmp_path / "d2", {"w": tau})
    std = float(tau.double().std(unbiased=False))
    compress_delta(str(tmp_path / "d2"), tmp_path / "c2", density=1.0, alpha=c / std)
    torch.testing.assert_close(DeltaFile(tmp_path / "c2").get("w").materialize(), c * torch.sign(tau), rtol=1e-6, atol=0)


def test_compeft_hand_computed(tmp_path):
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(16, 24, generator=g)
    write_dense(tmp_path / "d", {"w": tau})
    result = compress_delta(str(tmp_path / "d"), tmp_path / "c", density=0.25, alpha=2.0)
    # TIES top-k rule: n_drop = 384 - int(0.25 * 384) = 288; keep |tau| >= the 288th smallest (1-indexed)
    keep = tau.abs() >= tau.abs().reshape(-1).sort().values[288 - 1]
    assert int(keep.sum()) == 97  # the official helper keeps the threshold entry too
    expected = 2.0 * tau.std(unbiased=False) * torch.sign(tau) * keep
    got = DeltaFile(tmp_path / "c").get("w").materialize()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    row = result.rows[0]
    assert row.error == pytest.approx(float((expected - tau).norm() / tau.norm()), rel=1e-5)
    assert row.stored_bytes == 384 // 8 + (97 + 7) // 8  # bit-packed mask + sign bits; the scale lives in delta.json
    assert row.ratio == pytest.approx(384 * 4 / 61)
    # top-k keeps the same entries with exact values
    compress_delta(str(tmp_path / "d"), tmp_path / "s", method="topk", density=0.25)
    torch.testing.assert_close(DeltaFile(tmp_path / "s").get("w").materialize(), tau * keep)
    with pytest.raises(DeltawiseError, match="density"):
        compress_delta(str(tmp_path / "d"), tmp_path / "x", density=0.0)


def test_tall_reconstructs_each_task_as_specified(llama_family, tmp_path):
    base = llama_family["base"]
    folders = []
    for i in (1, 2, 3):
        extract_delta(str(llama_family[f"ft{i}"]), str(base), tmp_path / f"task{i}", dtype="float32")
        folders.append(str(tmp_path / f"task{i}"))
    digests = [tree_digest(tmp_path / f"task{i}") for i in (1, 2, 3)]
    lams = [0.3, 0.4, 0.5]
    result = compress_tall(folders, tmp_path / "tall", lambdas=lams)
    assert json.loads((tmp_path / "tall" / "delta.json").read_text())["tasks"] == ["task1", "task2", "task3"]
    b = load_state(base)
    fts = [load_state(llama_family[f"ft{i}"]) for i in (1, 2, 3)]
    name = "model.layers.1.mlp.down_proj.weight"
    taus = [(ft[name] - b[name]) for ft in fts]  # float32 task vectors, as extracted with dtype=float32
    mtl = taus[0] + taus[1] + taus[2]
    for t, (tau, lam) in enumerate(zip(taus, lams)):
        mask = tau.abs() > lam * (mtl - tau).abs()
        apply_delta(str(tmp_path / "tall"), str(base), tmp_path / f"rec{t}", task=f"task{t + 1}")
        torch.testing.assert_close(load_state(tmp_path / f"rec{t}")[name], b[name] + mask * mtl, rtol=0, atol=1e-6)
        assert 0 < mask.float().mean() < 1
    # storage: tau_MTL in float32 + one bit per entry per task
    numel = sum(v.numel() for v in b.values())
    assert result.stored_bytes == numel * 4 + 3 * sum((v.numel() + 7) // 8 for v in b.values())
    assert result.dense_bytes == 3 * numel * 4
    assert [tree_digest(tmp_path / f"task{i}") for i in (1, 2, 3)] == digests
    with pytest.raises(DeltawiseError, match="at least two"):
        compress_tall(folders[:1], tmp_path / "x")


def test_tall_refuses_deltas_of_different_bases(tmp_path):
    a = write_dense(tmp_path / "a", {"w": torch.ones(2, 2)}, fingerprint="one")
    b = write_dense(tmp_path / "b", {"w": torch.ones(2, 2)}, fingerprint="two")
    with pytest.raises(DeltawiseError, match="different base models"):
        compress_tall([str(a), str(b)], tmp_path / "t")
