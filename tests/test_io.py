"""The io layer: lazy reader over every checkpoint layout, hub resolution, streaming sharded writer,
and an end-to-end sharded merge that transformers loads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_state
from deltawise.errors import DeltawiseError, InputError, OutputError
from deltawise.io.reader import ModelReader
from deltawise.io.resolve import PICKLE_PATTERNS, WEIGHT_PATTERNS, resolve_model
from deltawise.io.writer import OutputTensor, StreamingShardWriter, parse_size, partial_name, plan_shards
from deltawise.merge import merge


# --------------------------------------------------------------------------- helpers
def sample_tensors() -> dict[str, torch.Tensor]:
    """Mixed shapes and dtypes, including a scalar and an empty tensor."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=gen),
        "model.layers.0.mlp.weight": torch.randn(6, 3, 2, generator=gen, dtype=torch.float64),
        "model.layers.0.norm.weight": torch.randn(5, generator=gen).to(torch.bfloat16),
        "model.layers.1.mlp.weight": torch.randn(7, 4, generator=gen).to(torch.float16),
        "position_ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "mask": torch.rand(4, 2, generator=gen) > 0.5,
        "scale": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype, what
    assert tuple(a.shape) == tuple(b.shape), what
    # compare raw bytes: exact even for NaN payloads and signed zeros
    assert a.contiguous().reshape(-1).view(torch.uint8).tolist() == b.contiguous().reshape(-1).view(torch.uint8).tolist(), what


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int = 3, index_extra: dict | None = None) -> Path:
    """A hand-made sharded checkpoint: model-0000i-of-0000N.safetensors plus the index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(n_shards):
        group = names[i::n_shards]
        filename = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in group}, folder / filename, metadata={"format": "pt"})
        weight_map.update({k: filename for k in group})
    weight_map.update(index_extra or {})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def make_layout(layout: str, root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    if layout == "single":
        root.mkdir()
        save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
        return root
    if layout == "sharded":
        return write_sharded(root, tensors)
    if layout == "file":
        root.mkdir()
        save_file(tensors, root / "weights.safetensors")
        return root / "weights.safetensors"
    if layout == "loose":
        root.mkdir()
        names = list(tensors)
        save_file({k: tensors[k] for k in names[:3]}, root / "part-a.safetensors")
        save_file({k: tensors[k] for k in names[3:]}, root / "part-b.safetensors")
        return root
    raise ValueError(layout)


LAYOUTS = ["single", "sharded", "file", "loose"]


# --------------------------------------------------------------------------- reader
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_reads_every_layout(layout, tmp_path):
    tensors = sample_tensors()
    location = make_layout(layout, tmp_path / "m", tensors)
    reader = ModelReader(location)
    assert sorted(reader.keys()) == sorted(tensors)
    assert len(reader) == len(tensors)
    for name, expected in tensors.items():
        assert name in reader
        info = reader.info(name)
        assert info.shape == tuple(expected.shape) and info.dtype == expected.dtype, name
        assert_bit_equal(reader.get(name), expected, name)
    assert reader.total_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    expected_folder = location if location.is_dir() else location.parent
    assert reader.folder == expected_folder
    with pytest.raises(InputError, match="no tensor 'nope'"):
        reader.get("nope")
    reader.close()


def test_sharded_reader_opens_only_indexed_shards(tmp_path):
    tensors = sample_tensors()
    folder = write_sharded(tmp_path / "m", tensors)
    # a stray file the index does not name must not contribute tensors
    save_file({"stray": torch.ones(3)}, folder / "stray.safetensors")
    reader = ModelReader(folder)
    assert sorted(reader.keys()) == sorted(tensors)
    assert sorted(f.name for f in reader.files) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_sharded_index_naming_a_missing_shard_is_refused(tmp_path):
    folder = write_sharded(tmp_path / "m", sample_tensors())
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(InputError, match="model-00002-of-00003.safetensors"):
        ModelReader(folder)


def test_sharded_index_naming_a_tensor_absent_from_its_shard_is_refused(tmp_path):
    folder = write_sharded(tmp_path / "m", sample_tensors(), index_extra={"lost.weight": "model-00001-of-00003.safetensors"})
    with pytest.raises(InputError, match="lost.weight"):
        ModelReader(folder)


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("rows", [(0, 10), (0, 1), (3, 7), (9, 10), (4, 4)])
def test_get_rows_equals_slicing(layout, rows, tmp_path):
    tensors = sample_tensors()
    reader = ModelReader(make_layout(layout, tmp_path / "m", tensors))
    start, stop = rows
    assert_bit_equal(reader.get_rows("model.embed_tokens.weight", start, stop), tensors["model.embed_tokens.weight"][start:stop])
    mlp = tensors["model.layers.0.mlp.weight"]  # 3-d, float64
    s, e = min(start, 6), min(stop, 6)
    assert_bit_equal(reader.get_rows("model.layers.0.mlp.weight", s, e), mlp[s:e])


def test_get_rows_past_the_end_never_returns_another_tensors_bytes(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    a = torch.arange(12.0).reshape(4, 3)
    save_file({"a": a, "b": torch.full((2, 3), 7.0)}, folder / "model.safetensors")
    reader = ModelReader(folder)
    try:
        got = reader.get_rows("a", 2, 6)
    except (DeltawiseError, IndexError, ValueError):
        return  # refusing is fine
    assert_bit_equal(got, a[2:6])  # clamping like slicing is fine too


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8,
          torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_round_trip_through_reader_and_writer(dtype, tmp_path):
    gen = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        value = torch.rand(6, 5, generator=gen) > 0.5
    elif dtype.is_floating_point:
        value = (torch.randn(6, 5, generator=gen) * 100).to(dtype)
        value[0, 0] = -0.0
    else:
        info = torch.iinfo(dtype)
        value = torch.randint(info.min, info.max, (6, 5), generator=gen, dtype=torch.int64).to(dtype)
        value[0, 0], value[0, 1] = info.min, info.max
    src = tmp_path / "in"
    src.mkdir()
    save_file({"x": value, "s": value[0, 0].clone()}, src / "model.safetensors")
    reader = ModelReader(src)
    assert reader.info("x").dtype == dtype
    assert_bit_equal(reader.get("x"), value)
    assert_bit_equal(reader.get_rows("x", 2, 5), value[2:5])
    assert_bit_equal(reader.get("s"), value[0, 0])
    # and back out through the streaming writer, in row chunks
    out = tmp_path / "out"
    out.mkdir()
    plan = plan_shards([OutputTensor("x", tuple(value.shape), dtype), OutputTensor("s", (), dtype)], 10**9)
    writer = StreamingShardWriter(out, plan)
    writer.write("s", reader.get("s"))
    for start in (4, 0, 2):
        writer.write("x", reader.get_rows("x", start, start + 2), row_start=start)
    loaded = load_file(out / "model.safetensors")
    assert_bit_equal(loaded["x"], value)
    assert_bit_equal(loaded["s"], value[0, 0])


def rewrite(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, file, metadata={"format": "pt"})


def fingerprint_after(edit, tmp_path) -> tuple[str, str]:
    """Fingerprint of a model folder before and after ``edit(folder, tensors)``, which may
    return another folder to fingerprint (a copy)."""
    tensors = sample_tensors()
    folder = make_layout("single", tmp_path / "m", tensors)
    before = ModelReader(folder).fingerprint()
    after_folder = edit(folder, tensors) or folder
    return before, ModelReader(after_folder).fingerprint()


def _change_value(folder, t):
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"].clone()
    t["model.embed_tokens.weight"][3, 1] += 1.0
    rewrite(folder / "model.safetensors", t)


def _change_shape(folder, t):
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:9].clone()
    rewrite(folder / "model.safetensors", t)


def _change_dtype(folder, t):
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"].double()
    rewrite(folder / "model.safetensors", t)


def _rename(folder, t):
    t["model.embed_tokens.renamed"] = t.pop("model.embed_tokens.weight")
    rewrite(folder / "model.safetensors", t)


def _same_bytes_rewritten(folder, t):
    time.sleep(0.02)
    rewrite(folder / "model.safetensors", t)


def _touch(folder, t):
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _copied_elsewhere(folder, t):
    return shutil.copytree(folder, folder.parent / "elsewhere" / "copy")


@pytest.mark.parametrize(
    "edit",
    [
        _change_shape,
        _change_dtype,
        _rename,
        _change_value,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_fingerprint_changes_when_a_tensor_changes(edit, tmp_path):
    before, after = fingerprint_after(edit, tmp_path)
    assert before != after


@pytest.mark.parametrize("edit", [_same_bytes_rewritten, _touch, _copied_elsewhere], ids=lambda f: f.__name__.strip("_"))
def test_fingerprint_is_stable_otherwise(edit, tmp_path):
    before, after = fingerprint_after(edit, tmp_path)
    assert before == after


def test_fingerprint_tells_fine_tunes_of_one_base_apart(llama_family):
    prints = {name: ModelReader(path).fingerprint() for name, path in llama_family.items()}
    assert len(set(prints.values())) == len(prints), prints


def test_changed_files_detects_modifications(tmp_path):
    tensors = sample_tensors()
    folder = write_sharded(tmp_path / "m", tensors)
    reader = ModelReader(folder)
    shard1, shard2, shard3 = (folder / f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
    assert reader.changed_files() == []
    reader.get("model.embed_tokens.weight")  # reading changes nothing
    assert reader.changed_files() == []

    time.sleep(0.02)  # same size, new contents: only the modification time tells
    state = load_file(shard2)
    first = next(iter(state))
    state[first] = torch.zeros_like(state[first])
    rewrite(shard2, state)
    (stamp,) = [s for s in reader.stamps if Path(s.path).name == shard2.name]
    assert shard2.stat().st_size == stamp.size
    assert [Path(p).name for p in reader.changed_files()] == [shard2.name]

    with open(shard3, "ab") as fh:  # grown
        fh.write(b"\0" * 8)
    shard1.unlink()  # deleted
    assert sorted(Path(p).name for p in reader.changed_files()) == sorted(p.name for p in (shard1, shard2, shard3))


# --------------------------------------------------------------------------- resolve_model
@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Replaces huggingface_hub.snapshot_download; records its calls. Default: must not be called."""
    import huggingface_hub

    calls: list[dict] = []
    state = {"result": None}

    def fake(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        if state["result"] is None:
            raise AssertionError(f"snapshot_download({repo_id!r}) must not be called")
        if isinstance(state["result"], Exception):
            raise state["result"]
        return str(state["result"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fake.calls, fake.state = calls, state
    return fake


def local_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(2, 2)}, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("ref", ["models/tiny", "./models/tiny", "models/tiny/model.safetensors", "owner/name"])
def test_existing_relative_path_resolves_locally(ref, hub, tmp_path):
    local_model(tmp_path / "models" / "tiny")
    local_model(tmp_path / "owner" / "name")  # even a hub-shaped id that exists on disk is local
    path = resolve_model(ref)
    assert path.exists() and path.resolve() == (tmp_path / ref).resolve()
    assert hub.calls == []


@pytest.mark.parametrize("ref", ["./missing", "../missing", "models/missing", "/nonexistent/dir/x", "models/tiny/missing"])
def test_missing_path_like_reference_never_reaches_the_hub(ref, hub, tmp_path):
    local_model(tmp_path / "models" / "tiny")
    with pytest.raises(InputError, match="not found"):
        resolve_model(ref)
    assert hub.calls == []


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_bare_hub_id_downloads_with_weight_patterns(allow_pickle, hub, tmp_path):
    downloaded = local_model(tmp_path / "cache" / "snapshot")
    hub.state["result"] = downloaded
    assert resolve_model("some-owner/some-model", revision="abc123", allow_pickle=allow_pickle) == downloaded
    (call,) = hub.calls
    assert call["repo_id"] == "some-owner/some-model"
    assert call["revision"] == "abc123"
    patterns = call["allow_patterns"]
    assert set(WEIGHT_PATTERNS) <= set(patterns)
    assert "*.safetensors" in patterns
    assert ("*.bin" in patterns) is allow_pickle
    if allow_pickle:
        assert set(PICKLE_PATTERNS) <= set(patterns)
    else:
        assert not any(".bin" in p or ".pt" in p for p in patterns)


def test_hf_prefix_forces_the_hub_even_when_a_local_folder_exists(hub, tmp_path):
    local_model(tmp_path / "owner" / "name")
    downloaded = local_model(tmp_path / "cache" / "snapshot")
    hub.state["result"] = downloaded
    assert resolve_model("hf://owner/name") == downloaded
    assert [c["repo_id"] for c in hub.calls] == ["owner/name"]


def test_invalid_hub_id_is_refused_without_a_call(hub):
    with pytest.raises(InputError):
        resolve_model("hf://not a valid id")
    assert hub.calls == []


@pytest.mark.parametrize("offline", [True, False])
def test_failed_download_explains_offline_mode(offline, hub, monkeypatch):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.state["result"] = OSError("no connection")
    with pytest.raises(InputError) as info:
        resolve_model("owner/name")
    message = str(info.value)
    assert "owner/name" in message and "no connection" in message
    assert ("offline" in message.lower()) is offline
    assert len(hub.calls) == 1


# --------------------------------------------------------------------------- writer
def out_tensors(n: int = 6, rows: int = 25) -> list[OutputTensor]:
    return [OutputTensor(f"t.{i}", (rows, 10), torch.float32) for i in range(n)]  # 1000 bytes each


def test_plan_shards_names_and_packing():
    plan = plan_shards(out_tensors(), 2500)
    names = [s.filename for s in plan.shards]
    assert names == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [[t.name for t in s.tensors] for s in plan.shards] == [["t.0", "t.1"], ["t.2", "t.3"], ["t.4", "t.5"]]
    assert all(sum(t.nbytes for t in s.tensors) <= 2500 for s in plan.shards)
    index = plan.index()
    assert index["metadata"]["total_size"] == 6000
    assert index["weight_map"] == {f"t.{i}": names[i // 2] for i in range(6)}


def test_plan_shards_single_and_oversized():
    assert [s.filename for s in plan_shards(out_tensors(), 10**9).shards] == ["model.safetensors"]
    big = [OutputTensor("small", (10,), torch.float32), OutputTensor("huge", (1000,), torch.float32),
           OutputTensor("tail", (10,), torch.float32)]
    shards = plan_shards(big, 100).shards
    assert [[t.name for t in s.tensors] for s in shards] == [["small"], ["huge"], ["tail"]]
    assert [s.filename for s in shards] == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]


def mixed_output() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {
        "a.weight": torch.randn(9, 7, generator=gen),
        "b.weight": torch.randn(5, 3, generator=gen).to(torch.bfloat16),  # 30 bytes: tests alignment
        "c.ids": torch.arange(11, dtype=torch.int64),
        "d.mask": torch.rand(3, 3, generator=gen) > 0.5,
        "e.weight": torch.randn(12, 4, 2, generator=gen, dtype=torch.float64),
        "f.half": torch.randn(7, 5, generator=gen).to(torch.float16),
        "g.scalar": torch.tensor(-1.5),
    }


def chunks(t: torch.Tensor, step: int):
    if t.dim() == 0:
        return [(0, t)]
    return [(s, t[s:s + step]) for s in range(0, t.shape[0], step)]


def test_streaming_writer_any_order_row_chunks_bit_exact(tmp_path):
    tensors = mixed_output()
    plan = plan_shards([OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 300)
    assert len(plan.shards) >= 3
    writer = StreamingShardWriter(tmp_path, plan)
    pieces = [(name, start, part) for name, t in tensors.items() for start, part in chunks(t, 2)]
    for name, start, part in reversed(pieces):  # last rows of the last tensor first
        writer.write(name, part.clone(), row_start=start)
    writer.finish_empty_shards()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(plan.index()))

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted([s.filename for s in plan.shards] + ["model.safetensors.index.json"])  # no partials left
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for shard in plan.shards:
        assert writer.completed[shard.filename] == hashlib.sha256((tmp_path / shard.filename).read_bytes()).hexdigest()
        assert (tmp_path / shard.filename).stat().st_size == shard.size
        part = load_file(tmp_path / shard.filename)
        assert all(index["weight_map"][k] == shard.filename for k in part)
        loaded.update(part)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert_bit_equal(loaded[name], value, name)
    assert writer.pending_tensors() == set()


def test_streaming_writer_digests_match_the_files_under_concurrent_shuffled_writes(tmp_path, monkeypatch):
    """Each shard's sha256 is computed while it is written, from memory at the written frontier
    and by reading back what arrived out of order; a tiny read-back step and eight threads
    writing shuffled row chunks exercise both paths and every handover between threads."""
    import sys

    monkeypatch.setattr(StreamingShardWriter, "READ_BACK", 7)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: interleavings are what is tested
    try:
        _shuffled_concurrent_writes(tmp_path)
    finally:
        sys.setswitchinterval(previous)


def _shuffled_concurrent_writes(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    import random

    tensors = mixed_output()
    tensors["h.empty"] = torch.zeros(0, 4)
    plan = plan_shards([OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 300)
    for trial in range(5):
        out = tmp_path / str(trial)
        out.mkdir()
        done: list[str] = []
        writer = StreamingShardWriter(out, plan, on_complete=lambda f, d: done.append(f))
        pieces = [(name, start, part.clone()) for name, t in tensors.items() for start, part in chunks(t, 1)]
        pieces.append(("h.empty", 0, tensors["h.empty"]))
        random.Random(trial).shuffle(pieces)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: writer.write(p[0], p[2], row_start=p[1]), pieces))
        writer.finish_empty_shards()
        assert sorted(done) == sorted(s.filename for s in plan.shards)  # each shard finished exactly once
        assert not list(out.glob(".*.partial"))
        for shard in plan.shards:
            data = (out / shard.filename).read_bytes()
            assert len(data) == shard.size
            assert writer.completed[shard.filename] == hashlib.sha256(data).hexdigest()
            for name, value in load_file(out / shard.filename).items():
                assert_bit_equal(value, tensors[name], name)


def test_writer_refuses_a_chunk_of_the_wrong_dtype(tmp_path):
    plan = plan_shards([OutputTensor("a", (4, 2), torch.float32)], 10**9)
    writer = StreamingShardWriter(tmp_path, plan)
    with pytest.raises(OutputError, match="'a'"):
        writer.write("a", torch.zeros(4, 2, dtype=torch.float16))


def test_abort_removes_partial_files_and_keeps_completed_shards(tmp_path):
    tensors = mixed_output()
    plan = plan_shards([OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 300)
    writer = StreamingShardWriter(tmp_path, plan)
    first, second = plan.shards[0], plan.shards[1]
    for t in first.tensors:  # first shard complete
        writer.write(t.name, tensors[t.name])
    writer.write(second.tensors[0].name, tensors[second.tensors[0].name][:1])  # second shard started
    assert (tmp_path / partial_name(second.filename)).exists()
    assert (tmp_path / first.filename).exists()
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.filename]
    assert load_file(tmp_path / first.filename).keys() == {t.name for t in first.tensors}


@pytest.mark.parametrize(
    "text, expected",
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("500MiB", 500 * 2**20), ("1.5gb", 1_500_000_000),
     (" 10 KB ", 10_000), ("4096", 4096), (123, 123)],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["abc", "", "GB", "5XB", "-5GB", "0GB", "5 G B B",
     "infGB", "nanGB"],
)
def test_parse_size_rejects(text):
    with pytest.raises(OutputError, match="cannot read size"):
        parse_size(text)


# --------------------------------------------------------------------------- end to end
def test_sharded_merge_end_to_end_loads_in_transformers(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    recipe = {"merge_method": "linear", "models": [{"model": str(llama_family["ft1"])}, {"model": str(llama_family["ft2"])}]}
    result = merge(recipe, str(out), shard_size=40_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    n = len(shard_files)
    assert n >= 3
    assert shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shard_files
    assert not list(out.glob(".*")), "hidden partial or staging files left in the output"
    assert sorted(result.files) == sorted(p.name for p in out.iterdir())

    merged = load_state(out)
    ft1, ft2 = load_state(llama_family["ft1"]), load_state(llama_family["ft2"])
    assert set(index["weight_map"]) == set(merged) == set(ft1)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in merged.values())
    for name, value in merged.items():
        assert value.dtype == ft1[name].dtype
        torch.testing.assert_close(value, (ft1[name] + ft2[name]) / 2, rtol=0, atol=1e-6)

    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((llama_family["ft1"] / "config.json").read_text())

    manifest = json.loads((out / "deltawise_merge.json").read_text())
    assert sorted(s["file"] for s in manifest["shards"]) == shard_files
    for shard in manifest["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
    fingerprints = {i["model"]: i["fingerprint"] for i in manifest["inputs"]}
    assert set(fingerprints) == {str(llama_family["ft1"]), str(llama_family["ft2"])}
    for model, fp in fingerprints.items():
        assert fp == ModelReader(model).fingerprint()

    card = (out / "README.md").read_text()
    assert "linear" in card
    for model, fp in fingerprints.items():
        assert model in card and fp[:16] in card

    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for name, value in merged.items():
        assert torch.equal(state[name], value), f"{name} was not loaded from the merged shards"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, 128)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("durable", [False, True])
def test_streaming_writer_fsyncs_each_shard_only_when_durable(tmp_path, monkeypatch, durable):
    import deltawise.io.writer as writer_module

    synced = []
    real_fsync = writer_module.os.fsync
    monkeypatch.setattr(writer_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    tensors = mixed_output()
    plan = plan_shards([OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 300)
    writer = StreamingShardWriter(tmp_path, plan, durable=durable)
    for name, value in tensors.items():
        writer.write(name, value)
    writer.finish_empty_shards()
    assert sorted(writer.completed) == sorted(s.filename for s in plan.shards)
    assert len(synced) == (len(plan.shards) if durable else 0)
