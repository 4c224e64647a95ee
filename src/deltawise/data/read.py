"""Read a data file or folder into items: the one reader behind every ``--data``, ``--source`` and ``--target``.

``train``, ``eval``, ``analyze interpolate`` and the data-driven merges (``fisher``, ``gram``, ``soup``, ``atlas``)
all read here, so one file means the same documents to each of them.

Formats
    * JSONL: a ``.jsonl`` / ``.json`` file, or any other file whose first non-blank character is ``{``;
      one JSON object per line, blank lines skipped. An item's id is its ``id`` field, else its record
      number (0-based, blank lines not counted).
    * ``datasets`` folder saved with ``save_to_disk`` (a ``DatasetDict`` gives its ``test`` split,
      else its first split by name); needs the optional ``datasets`` package.
    * plain text: any other UTF-8 file, whatever its suffix (Debian fortune files have none), split
      into documents by ``split_documents``; a document's id is its number (0-based).

Refused with a message naming the file: structured or compressed formats that would read as garbage
text (``REFUSED_SUFFIXES``), binary or non-UTF-8 files, folders that are not ``datasets`` folders, and
FIFOs, devices or sockets (reading one would block or never end).

What the fields mean (``text``; ``prompt`` + ``response``; ``text`` + ``label``; ``choices`` + ``answer``)
is up to the caller: ``load_items`` checks that items carry the fields an evaluation needs, and
``deltawise.adapt.data.read_examples`` turns items into training examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deltawise.errors import InputError, require_regular_file

Format = Literal["text", "jsonl", "datasets"]

JSONL_SUFFIXES = {".jsonl", ".json"}
# Structured and compressed formats that would silently read as garbage text.
REFUSED_SUFFIXES = {".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zip", ".xz", ".bz2", ".zst", ".pdf"}
WHAT_TO_GIVE = "give plain text (UTF-8), JSONL (one JSON object per line) or a `datasets` folder saved with save_to_disk"


@dataclass(frozen=True)
class Item:
    """One record or document, with a stable id so per-item results can be matched between runs."""

    id: str
    fields: dict[str, Any] = field(default_factory=dict)
    # "file:line" for JSONL, "file, document i" / "file, record i" otherwise; only for error messages
    origin: str = field(default="", compare=False, repr=False)

    @property
    def text(self) -> str:
        return self.fields["text"]

    @property
    def where(self) -> str:
        """The item for an error message: where it came from and its id."""
        return f"{self.origin} (item {self.id!r})" if self.origin else f"item {self.id!r}"


@dataclass(frozen=True)
class DataFile:
    """The items of one data file or folder, and the format they were read in."""

    path: Path
    format: Format
    items: list[Item]


def split_documents(text: str) -> list[str]:
    """Documents of a plain text: stripped, empty ones dropped.

    When some line holds only ``%`` (Debian fortune format, see strfile(1)), those lines alone separate
    documents, so a blank line inside a fortune stays inside it. Otherwise blank (or whitespace-only)
    lines separate documents. Lines within a document are joined with ``\\n``.
    """
    lines = text.splitlines()
    separator = "%" if any(line.strip() == "%" for line in lines) else ""
    docs, current = [], []
    for line in lines:
        if line.strip() == separator:
            docs.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current).strip())
    return [d for d in docs if d]


def read_data(path: str | Path) -> DataFile:
    """Every item of a data file or folder, in file order; InputError for what cannot be read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"dataset {str(path)!r} not found")
    if path.is_dir():
        return DataFile(path, "datasets", _datasets_items(path))
    if path.suffix.lower() in REFUSED_SUFFIXES:
        raise InputError(f"{path}: unsupported dataset format {path.suffix!r}; {WHAT_TO_GIVE}")
    require_regular_file(path, "dataset")  # reading a FIFO would wait for a writer forever
    text = _read_text(path)
    by_suffix = path.suffix.lower() in JSONL_SUFFIXES
    if by_suffix or text.lstrip().startswith("{"):
        return DataFile(path, "jsonl", _jsonl_items(path, text, by_suffix))
    docs = split_documents(text)
    return DataFile(path, "text", [Item(str(i), {"text": d}, f"{path}, document {i}") for i, d in enumerate(docs)])


def load_items(path: str | Path, require: tuple[str, ...] = ("text",)) -> list[Item]:
    """Items of a dataset to evaluate or score: at least one, unique ids, each carrying the fields in ``require``."""
    data = read_data(path)
    if not data.items:
        raise InputError(f"{data.path}: no items found")
    seen: set[str] = set()
    for item in data.items:
        if item.id in seen:
            raise InputError(f"{item.where}: duplicate id {item.id!r} (ids must be unique to match items across runs)")
        seen.add(item.id)
        missing = [f for f in require if f not in item.fields]
        if missing:
            raise InputError(f"{item.where}: lacks field(s) {missing}; expected {list(require)}")
    return data.items


def _read_text(path: Path) -> str:
    """The file as text, with newlines made ``\\n`` (as ``Path.read_text`` does); binary or non-UTF-8 is refused."""
    raw = path.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise InputError(f"{path} is binary (a NUL byte at offset {nul}), not text; {WHAT_TO_GIVE}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); {WHAT_TO_GIVE}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_items(path: Path, text: str, by_suffix: bool) -> list[Item]:
    why = "" if by_suffix else " (read as JSONL because it starts with '{')"
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object per line{why}") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{lineno}: each line must be a JSON object{why}")
        items.append(Item(str(record.get("id", len(items))), record, f"{path}:{lineno}"))
    return items


def _datasets_items(path: Path) -> list[Item]:
    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise InputError(
            f"{path} is a folder but not a `datasets` folder saved with save_to_disk "
            f"(no dataset_info.json or dataset_dict.json); {WHAT_TO_GIVE}"
        )
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise InputError(f"{path} is a `datasets` folder, but the `datasets` package is not installed "
                         "(pip install datasets)") from None
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        # A DatasetDict holds splits; evaluating on a test split is the only safe default.
        split = "test" if "test" in ds else min(ds)
        ds = ds[split]
    return [Item(str(record.get("id", i)), dict(record), f"{path}, record {i}") for i, record in enumerate(ds)]
