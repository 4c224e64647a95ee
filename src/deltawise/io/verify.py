"""Check a model folder's files: safetensors structure, index consistency and, for deltawise
outputs, every shard's size and sha256 against the manifest (``deltawise_merge.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from deltawise.errors import DeltawiseError, InputError
from deltawise.io.output import MANIFEST
from deltawise.io.reader import ModelReader
from deltawise.io.writer import sha256_file



@dataclass
class VerifyReport:
    folder: Path
    checked: list[str] = field(default_factory=list)  # files whose checks passed
    problems: list[str] = field(default_factory=list)
    has_manifest: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_folder(folder: str | Path) -> VerifyReport:
    folder = Path(folder)
    report = VerifyReport(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    shards = sorted(folder.glob("*.safetensors"))
    manifest_path = folder / MANIFEST
    expected: dict[str, dict] = {}
    if manifest_path.exists():
        report.has_manifest = True
        try:
            expected = {s["file"]: s for s in json.loads(manifest_path.read_text())["shards"]}
        except (ValueError, KeyError, TypeError) as exc:
            report.problems.append(f"{MANIFEST} is unreadable ({exc})")
    for name in sorted(set(expected) - {p.name for p in shards}):
        report.problems.append(f"{name} is listed in {MANIFEST} but missing")
    if not shards and not expected:
        report.problems.append("no .safetensors files")
    for path in shards:
        before = len(report.problems)
        try:
            ModelReader(path)  # validates the header, offsets and length
        except DeltawiseError as exc:
            report.problems.append(str(exc))
        want = expected.get(path.name)
        if want is not None:
            if path.stat().st_size != want["bytes"]:
                report.problems.append(f"{path.name}: {path.stat().st_size} bytes, the manifest says {want['bytes']}")
            elif sha256_file(path) != want["sha256"]:
                report.problems.append(f"{path.name}: sha256 differs from the manifest (the file was modified or damaged)")
        elif report.has_manifest:
            report.problems.append(f"{path.name} is not listed in {MANIFEST}")
        if len(report.problems) == before:
            report.checked.append(path.name)
    _check_index(folder, report)
    return report


def _check_index(folder: Path, report: VerifyReport) -> None:
    for index_path in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            report.problems.append(f"{index_path.name} is unreadable ({exc})")
            continue
        try:
            ModelReader(folder)  # checks that every indexed tensor is in its shard
        except DeltawiseError as exc:
            report.problems.append(str(exc))
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).exists():
                report.problems.append(f"{index_path.name} names missing shard {shard}")
