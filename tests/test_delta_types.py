"""Each delta type: size, dense form (against hand-computed formulas), apply in any dtype,
and a save/load round trip through a delta folder."""

from __future__ import annotations

import json

import pytest
import torch

from deltawise.delta import DenseDelta, LowRankDelta, MaskedDelta, SparseDelta, SpectralDelta, TallDelta, TernaryDelta
from deltawise.delta.bits import pack_bits, unpack_bits
from deltawise.delta.store import DeltaFile, DeltaWriter
from deltawise.errors import InputError, OutputError

g = torch.Generator().manual_seed(0)
TAU = torch.randn(6, 10, generator=g)
MASK = TAU.abs() > 0.8


def examples() -> dict[str, tuple[object, torch.Tensor]]:
    """name -> (delta, its dense form computed by hand)."""
    A, B = torch.randn(3, 10, generator=g), torch.randn(6, 3, generator=g)
    idx = torch.tensor([0, 7, 23, 59])
    coef = torch.tensor([1.0, -2.0, 0.5, 3.0])
    F = torch.zeros(6, 10, dtype=torch.complex64)
    F.view(-1)[idx] = coef.to(torch.complex64)
    masks = [TAU > 0, TAU < 0.5]
    return {
        "dense": (DenseDelta(TAU.clone()), TAU),
        "lowrank": (LowRankDelta(A, B, 0.5), 0.5 * B @ A),
        "lowrank_t": (LowRankDelta(torch.randn(3, 6, generator=g), torch.randn(10, 3, generator=g), 2.0, transpose=True), None),
        "sparse": (SparseDelta.from_dense(TAU, MASK), TAU * MASK),
        "ternary": (TernaryDelta.from_dense(TAU, MASK, 0.25), 0.25 * torch.sign(TAU) * MASK),
        "spectral": (SpectralDelta((6, 10), idx, coef, 3.0), 3.0 * torch.fft.ifft2(F).real),
        "tall": (TallDelta(TAU.clone(), [pack_bits(m) for m in masks]), TAU),
        "masked": (MaskedDelta(TAU.clone(), pack_bits(masks[1])), TAU * masks[1]),
    }


def test_bits_round_trip_and_size():
    mask = torch.rand(7, 13, generator=g) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.numel(), mask.shape), mask)


@pytest.mark.parametrize("name", list(examples()))
def test_materialize_matches_formula(name):
    delta, expected = examples()[name]
    if name == "lowrank_t":
        expected = (2.0 * delta.B @ delta.A).T
    got = delta.materialize()
    assert got.shape == delta.shape == tuple(expected.shape)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    # rows() agrees with slicing the dense form
    torch.testing.assert_close(delta.rows(2, 5), expected.float()[2:5], rtol=1e-5, atol=1e-6)


def test_sizes_are_what_is_stored():
    d = examples()
    assert d["dense"][0].nbytes == 60 * 4
    assert d["ternary"][0].nbytes == 8 + (int(MASK.sum()) + 7) // 8  # mask bits + one sign bit per kept entry
    assert d["sparse"][0].nbytes == 8 + int(MASK.sum()) * 4
    assert d["lowrank"][0].nbytes == (30 + 18) * 4
    assert d["spectral"][0].nbytes == 4 * 8 + 4 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_computes_in_float32_and_keeps_dtype(dtype):
    base = torch.randn(6, 10, generator=g).to(dtype)
    delta, expected = examples()["ternary"]
    out = delta.apply(base, scale=-2.0)
    assert out.dtype == dtype
    assert torch.equal(out, (base.float() - 2.0 * expected).to(dtype))
    with pytest.raises(InputError, match="shape"):
        delta.apply(torch.zeros(10, 6))


def test_folder_round_trip(tmp_path):
    items = {k: v for k, v in examples().items() if k != "masked"}  # masked deltas exist only as a TALL selection
    header = {"method": "test", "parameters": {"p": 1}, "base": {"ref": "x", "fingerprint": "abc"}, "tasks": ["a", "b"]}
    with DeltaWriter(tmp_path / "d", header, [], shard_bytes=200) as w:  # tiny shards: several files
        for name, (delta, _) in items.items():
            w.add(f"t.{name}", delta, torch.bfloat16)
        w.finish()
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert "delta.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["base"]["fingerprint"] == "abc" and meta["tensors"]["t.ternary"]["kind"] == "ternary"
    f = DeltaFile(tmp_path / "d", task="b")
    for name, (delta, _) in items.items():
        back = f.get(f"t.{name}")
        expected = delta.select(1) if name == "tall" else delta
        assert back.kind == expected.kind and back.shape == delta.shape
        assert torch.equal(back.materialize(), expected.materialize())
    with pytest.raises(InputError, match="choose one with --task"):
        DeltaFile(tmp_path / "d")
    with pytest.raises(InputError, match="no task 'c'"):
        DeltaFile(tmp_path / "d", task="c")


def test_writer_refuses_non_empty_output_and_leaves_nothing_on_error(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(OutputError, match="not empty"):
        DeltaWriter(tmp_path / "full", {}, [])
    with pytest.raises(RuntimeError):
        with DeltaWriter(tmp_path / "new", {}, []) as w:
            w.add("a", DenseDelta(TAU), torch.float32)
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_full_delta_is_a_new_value_taken_as_is(tmp_path):
    """``full``: against a base tensor its delta is value − base (scale 1 gives value exactly, in
    any dtype); a tensor the base lacks is added by ``DeltaReader`` as stored."""
    from safetensors.torch import save_file

    from deltawise.delta import FullDelta
    from deltawise.delta.reader import DeltaReader
    from deltawise.delta.transfer import check_transfer
    from deltawise.io.reader import ModelReader

    value, head = torch.randn(6, 10, generator=g), torch.randn(2, 10, generator=g)
    base = torch.randn(6, 10, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(FullDelta(value).apply(base.to(dtype)), value.to(dtype))
    torch.testing.assert_close(FullDelta(value).apply(base, 0.5), base + 0.5 * (value - base))
    with pytest.raises(InputError, match="only against a base tensor"):
        FullDelta(value).materialize()
    (tmp_path / "base").mkdir()
    save_file({"w": base, "other": torch.ones(3)}, tmp_path / "base" / "model.safetensors")
    with DeltaWriter(tmp_path / "d", {"method": "test", "base": {"ref": str(tmp_path / "base")}}, []) as w:
        w.add("w", FullDelta(value), torch.float32)
        w.add("score.weight", FullDelta(head), torch.bfloat16)
        w.finish()
    source = DeltaFile(tmp_path / "d")
    base_reader = ModelReader(tmp_path / "base")
    assert check_transfer(source, base_reader, "base") == []  # a new tensor is no problem
    reader = DeltaReader(source, base_reader)
    assert sorted(reader.keys()) == ["other", "score.weight", "w"] and len(reader) == 3 and "score.weight" in reader
    assert reader.info("score.weight").dtype == torch.bfloat16
    assert torch.equal(reader.get("w"), value) and torch.equal(reader.get("other"), torch.ones(3))
    assert torch.equal(reader.get("score.weight"), head.to(torch.bfloat16))
    assert torch.equal(reader.get_rows("score.weight", 1, 2), head[1:2].to(torch.bfloat16))
    half = DeltaReader(source, base_reader, scale=0.5)
    torch.testing.assert_close(half.get("w"), base + 0.5 * (value - base))
