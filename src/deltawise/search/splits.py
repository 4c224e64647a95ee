"""Selection and held-out splits for the searches: choose on one split, report on the other.

A search that picks a point (a merge's lambda, a soup's members) and reports that point's scores
on the data it picked with over-states them: of many noisy points, the best-looking one is the
luckiest. So every search file is cut into a selection split and a held-out split, or the user
names a held-out file per search file. The cut is by item, seeded and reproducible: the items of
file number ``position`` are shuffled with ``random.Random(f"{seed}:{position}")`` and the first
``round(fraction * n)`` are held out. Items keep their ids, so per-item results stay comparable.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from deltawise.data.read import Item, load_items
from deltawise.errors import InputError


@dataclass(frozen=True)
class Split:
    """One search file's two halves, as files the evaluation code reads."""

    source: Path  # the file the user gave
    selection: Path
    heldout: Path
    selection_ids: tuple[str, ...]
    heldout_ids: tuple[str, ...]
    heldout_source: Optional[Path]  # the held-out file the user named (None: the search file was cut)

    def to_json(self) -> dict[str, object]:
        return {"file": str(self.source), "heldout_file": None if self.heldout_source is None else str(self.heldout_source),
                "selection_items": len(self.selection_ids), "heldout_items": len(self.heldout_ids)}


def split_items(items: Sequence[Item], fraction: float, seed: int, position: int) -> tuple[list[Item], list[Item]]:
    """(selection, held-out) items: a seeded shuffle, the first ``round(fraction * n)`` held out."""
    order = list(items)
    random.Random(f"{seed}:{position}").shuffle(order)
    held = round(fraction * len(order))
    if held < 1 or held >= len(order):
        raise InputError(f"cannot hold out {fraction:g} of {len(order)} item(s) and keep both splits non-empty; "
                         "give more items or a held-out file of your own")
    heldout_ids = {i.id for i in order[:held]}
    return [i for i in items if i.id not in heldout_ids], [i for i in items if i.id in heldout_ids]


def write_items(path: Path, items: Sequence[Item]) -> Path:
    """JSONL with each item's fields and its id (so the two splits keep the original ids)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({**item.fields, "id": item.id}, ensure_ascii=False) + "\n")
    return path


def make_splits(files: Sequence[Path], heldout: Optional[Sequence[Path]], fraction: float, seed: int,
                folder: Path) -> list[Split]:
    """A ``Split`` per file: ``heldout[i]`` when given (one per file, in order), else a seeded cut of the
    file's items written under ``folder`` (file names keep the original stem, so dataset names stay)."""
    if heldout:
        if len(heldout) != len(files):
            raise InputError(f"give one held-out file per search file: {len(files)} file(s), {len(heldout)} held-out")
        splits = []
        for position, (source, held) in enumerate(zip(files, heldout)):
            if Path(held).resolve() == Path(source).resolve():
                raise InputError(f"{held} is both a search file and its held-out file: the report would be in-sample")
            held_items = load_items(held, require=())
            # written under the search file's stem, so both splits' datasets carry one name
            copy = write_items(folder / "heldout" / str(position) / f"{_stem(source)}.jsonl", held_items)
            splits.append(Split(Path(source), Path(source), copy, tuple(i.id for i in load_items(source, require=())),
                                tuple(i.id for i in held_items), Path(held)))
        return splits
    if not 0 < fraction < 1:
        raise InputError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    splits = []
    for position, source in enumerate(files):
        selection, held = split_items(load_items(source, require=()), fraction, seed, position)
        stem = _stem(source)
        splits.append(Split(Path(source), write_items(folder / "selection" / str(position) / f"{stem}.jsonl", selection),
                            write_items(folder / "heldout" / str(position) / f"{stem}.jsonl", held),
                            tuple(i.id for i in selection), tuple(i.id for i in held), None))
    return splits


def budget_splits(retain: Sequence[Path], targets: Sequence[Path], heldout_retain: Sequence[Path],
                  heldout_targets: Sequence[Path], fraction: float, seed: int, folder: Path) -> list[Split]:
    """The splits of a search with a retention budget (budget, repair, lr-sweep): the retain files then the
    target files, each with its given held-out file (all or none, in the same order) or cut in two."""
    given = list(heldout_retain) + list(heldout_targets)
    if given and (len(heldout_retain) != len(retain) or len(heldout_targets) != len(targets)):
        raise InputError("held-out files: give one per --retain and one per --target, in the same order, or none "
                         "(then each file is split)")
    return make_splits(list(retain) + list(targets), given or None, fraction, seed, folder)


def _stem(path: Path) -> str:
    return Path(path).stem or Path(path).name
