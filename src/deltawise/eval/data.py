"""Evaluation data in: plain text, JSONL, or a ``datasets`` folder saved with ``save_to_disk``.

Every loader returns a list of ``Item`` with a stable id, so per-item results (negative flips)
can be matched between two runs on the same data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltawise.errors import InputError

TEXT_SUFFIXES = {".txt", ".text", ""}
JSONL_SUFFIXES = {".jsonl", ".json"}
# Structured formats that would silently read as garbage text.
REFUSED_SUFFIXES = {".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zip", ".xz", ".bz2", ".zst", ".pdf"}


@dataclass(frozen=True)
class Item:
    id: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.fields["text"]


def split_documents(raw: str) -> list[str]:
    """Documents of a plain text file: split at blank lines or ``%`` lines, stripped, empties dropped."""
    # A line holding only "%" separates fortune entries (Debian fortune files); a blank line
    # separates documents in ordinary text files.
    docs, current = [], []
    for line in raw.splitlines():
        if line.strip() in ("", "%"):
            if current:
                docs.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    if current:
        docs.append("\n".join(current).strip())
    return [d for d in docs if d]


def _from_records(records: list[dict[str, Any]], where: str) -> list[Item]:
    items = []
    seen: set[str] = set()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{where}: record {i} is not a JSON object")
        item_id = str(rec.get("id", i))
        if item_id in seen:
            raise InputError(f"{where}: duplicate id {item_id!r} (ids must be unique to match items across runs)")
        seen.add(item_id)
        items.append(Item(item_id, dict(rec)))
    return items


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON ({exc}); expected one JSON object per line") from None
    return records


def _read_datasets_folder(path: Path) -> list[dict[str, Any]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise InputError(f"{path} looks like a `datasets` folder, but the `datasets` package is not installed (pip install datasets)") from None
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        # A DatasetDict holds splits; evaluating on a test split is the only safe default.
        split = "test" if "test" in ds else sorted(ds)[0]
        ds = ds[split]
    return [dict(r) for r in ds]


def load_items(path: str | Path, require: tuple[str, ...] = ("text",)) -> list[Item]:
    """Items of a dataset file or folder; each must carry the fields in ``require``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"dataset {str(path)!r} not found")
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise InputError(
                f"{path} is a folder but not a `datasets` folder saved with save_to_disk "
                "(no dataset_info.json or dataset_dict.json); give a .txt, a .jsonl or such a folder"
            )
        items = _from_records(_read_datasets_folder(path), str(path))
    elif path.suffix.lower() in REFUSED_SUFFIXES:
        raise InputError(f"{path}: unsupported dataset format {path.suffix!r}; give plain text, JSONL with a 'text' field, or a `datasets` folder")
    elif path.suffix.lower() in JSONL_SUFFIXES:
        items = _from_records(_read_jsonl(path), str(path))
    elif path.suffix.lower() in TEXT_SUFFIXES or _is_text(path):
        items = [Item(str(i), {"text": d}) for i, d in enumerate(split_documents(path.read_text(encoding="utf-8")))]
    else:
        raise InputError(f"{path}: unsupported dataset format {path.suffix!r}; give plain text, JSONL with a 'text' field, or a `datasets` folder")
    if not items:
        raise InputError(f"{path}: no items found")
    for item in items:
        missing = [f for f in require if f not in item.fields]
        if missing:
            raise InputError(f"{path}: item {item.id!r} lacks field(s) {missing}; expected {list(require)}")
    return items


def _is_text(path: Path) -> bool:
    """Fortune files have no suffix or odd ones (``computers``, ``de/liebe``): accept valid UTF-8 without NULs."""
    head = path.open("rb").read(65536)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # a multibyte character cut by the 64 KiB window
    return True
