"""benchmarks/fingerprint.py: hashes ignore only the run-specific parts of a file, and --compare reports
each difference and exits 1 (0 when all is equal)."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fingerprint.py"


@pytest.fixture(scope="module")
def fp():
    spec = importlib.util.spec_from_file_location("fingerprint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _safetensors(path: Path, metadata: dict[str, str], data: bytes) -> Path:
    tensor = {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [0, len(data)]}
    header = json.dumps({"__metadata__": metadata, "w": tensor})
    header += " " * (-len(header) % 8)  # the padding depends on the header's length, hence on paths inside it
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + data)
    return path


def test_json_hash_ignores_volatile_keys_and_the_work_path_but_not_values(fp, tmp_path):
    digests = []
    for work, seconds in (("/tmp/run-a", 1.5), ("/tmp/run-bb", 9.0)):
        folder = tmp_path / Path(work).name
        folder.mkdir()
        f = folder / "log.json"
        content = {"ref": f"{work}/models/base", "loss": [1.0, 0.5], "seconds": seconds, "nested": [{"created": work}]}
        f.write_text(json.dumps(content))
        digests.append(fp.file_digest(f, work))
    assert digests[0]["sha256"] == digests[1]["sha256"] and digests[0]["how"] == "json: canonical, cleaned"
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({"ref": "/tmp/run-a/models/base", "loss": [1.0, 0.25], "seconds": 1.5, "nested": [{}]}))
    assert fp.file_digest(changed, "/tmp/run-a")["sha256"] != digests[0]["sha256"]


def test_plain_files_hash_raw_bytes(fp, tmp_path):
    import hashlib

    f = tmp_path / "config.json"
    f.write_text('{"b": 1,  "a": 2}')  # not canonical: the raw bytes count
    digest = fp.file_digest(f, "/elsewhere")
    assert digest == {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "how": "bytes", "json": {"b": 1, "a": 2}}


def test_safetensors_hash_ignores_paths_and_key_order_in_metadata_but_not_tensor_bytes(fp, tmp_path):
    a = _safetensors(tmp_path / "a.safetensors", {"data": "/w/a/data.txt", "seconds": "3"}, b"\x00" * 16)
    b = _safetensors(tmp_path / "b.safetensors", {"data": "/w/abcd/data.txt", "seconds": "4"}, b"\x00" * 16)
    c = _safetensors(tmp_path / "c.safetensors", {"data": "/w/a/data.txt", "seconds": "3"}, b"\x00" * 15 + b"\x01")
    assert fp.file_digest(a, "/w/a")["sha256"] == fp.file_digest(b, "/w/abcd")["sha256"]
    reordered = _safetensors(tmp_path / "r.safetensors", {"seconds": "5", "data": "/w/a/data.txt"}, b"\x00" * 16)
    assert fp.file_digest(reordered, "/w/a")["sha256"] == fp.file_digest(a, "/w/a")["sha256"]  # metadata key order
    assert fp.file_digest(a, "/w/a")["sha256"] != fp.file_digest(c, "/w/a")["sha256"]


def test_compare_lists_differences_and_sets_the_exit_status(fp, tmp_path, capsys):
    def run(model_hash: str, losses: list[float], rc: int = 0) -> dict:
        files = {"out/m/model.safetensors": {"sha256": "a" * 64},
                 "out/m/deltawise_merge.json": {"sha256": model_hash, "json": {"seed": model_hash[:1]}}}
        return {"methods": ["linear", "ties"], "steps": {
            "merge/ties": {"rc": 0, "files": files},
            "train/lora": {"rc": rc, "files": {}, "losses": {"out/t/training_log.json": losses}}}}

    same_a, same_b, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    same_a.write_text(json.dumps(run("b" * 64, [4.5, 4.4])))
    same_b.write_text(json.dumps(run("b" * 64, [4.5, 4.4])))
    other.write_text(json.dumps(run("c" * 64, [4.5, 4.3], rc=1)))
    assert fp.compare(same_a, same_b) == 0
    assert "identical" in capsys.readouterr().out
    assert fp.compare(same_a, other) == 1
    printed = capsys.readouterr().out
    assert "out/m/deltawise_merge.json" in printed and "bbbbbbbbbbbbbbbb" in printed and "cccccccccccccccc" in printed
    assert "seed" in printed  # the key that differs inside the JSON file
    assert "(exit status)" in printed and "training_log.json: losses" in printed
    assert "out/m/model.safetensors" not in printed
