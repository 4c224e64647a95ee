"""The staging folder where a merge is assembled, and resuming an interrupted merge.

A merge writes into ``.OUT.deltawise-partial`` beside OUT. The folder holds a plan file (a
hash of everything that determines the output bytes: recipe, input fingerprints, shard
layout, output-defining constants) and a progress file listing the shards completed so far
with their sha256. After an interruption (Ctrl-C, SIGTERM, SIGKILL, a full disk) the completed
shards stay; ``--resume`` checks the plan hash, re-verifies each completed shard's bytes and
merges only the rest. Partial shard files are always discarded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltawise.errors import OutputError
from deltawise.io.output import STAGING_MARK, prepare_staging, staging_folder
from deltawise.io.writer import ShardPlan, sha256_file, write_json_atomic

PLAN_FILE = ".deltawise-plan.json"
PROGRESS_FILE = ".deltawise-progress.json"


# what a change in each part of the plan description means to the user
PART_NAMES = {
    "recipe": "a different recipe",
    "inputs": "different input files",
    "shards": "a different shard layout (was --shard-size changed?)",
    "version": "another deltawise version",
    "prepared": "a different method state (continual merging state or permutation search)",
    "rng_block": "another random-number layout",
}


def plan_key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def plan_parts(description: dict[str, Any]) -> dict[str, str]:
    """A hash per part of the description, kept in the plan file so that a refused resume says what differs."""
    return {name: plan_key({name: value}) for name, value in description.items()}


@dataclass
class Staging:
    folder: Path
    key: str
    completed: dict[str, str] = field(default_factory=dict)  # shard filename -> sha256

    def record(self, filename: str, digest: str) -> None:
        """Called as each shard is renamed into place; the progress file is replaced atomically."""
        self.completed[filename] = digest
        write_json_atomic(self.folder / PROGRESS_FILE, {"plan": self.key, "completed": self.completed})

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def finalize(self) -> None:
        for name in (PLAN_FILE, PROGRESS_FILE):  # the marker goes with swap_into_place
            (self.folder / name).unlink(missing_ok=True)


def open_staging(out: Path, key: str, shard_plan: ShardPlan, *, resume: bool, restart: bool,
                 parts: dict[str, str] | None = None) -> Staging:
    """A fresh staging folder, or the interrupted one when resuming the same plan. The caller holds
    the output's lock (``output_lock``), so no other run uses the folder."""
    folder = staging_folder(out)
    if folder.exists():
        if not (folder / STAGING_MARK).exists():
            raise OutputError(f"{folder} exists and was not made by deltawise; remove it and retry")
        previous = _read_json(folder / PLAN_FILE)
        if resume:
            if previous.get("plan") != key:
                raise OutputError(f"{folder} holds an interrupted merge with {_what_differs(previous, parts)}; "
                                  "run with --restart to discard it, or rerun it as it was")
            return Staging(folder, key, _verified_shards(folder, shard_plan, key))
        done = len(_read_json(folder / PROGRESS_FILE).get("completed", {}))
        if not restart and done:  # with no completed shard there is nothing to lose
            raise OutputError(
                f"found an interrupted merge in {folder} ({done} of {len(shard_plan.shards)} shards done); "
                "pass --resume to continue it or --restart to discard it"
            )
        shutil.rmtree(folder)
    elif resume:
        raise OutputError(f"nothing to resume: {folder} does not exist")
    folder = prepare_staging(out)
    write_json_atomic(folder / PLAN_FILE, {"plan": key, **({"parts": parts} if parts else {})})
    return Staging(folder, key)


def _what_differs(previous: dict, parts: dict[str, str] | None) -> str:
    old = previous.get("parts")
    if not isinstance(old, dict) or not parts:
        return "a different recipe or different inputs"
    changed = [PART_NAMES.get(name, name) for name in parts if old.get(name) != parts[name]]
    return ", ".join(changed) if changed else "a different recipe or different inputs"


def _verified_shards(folder: Path, shard_plan: ShardPlan, key: str) -> dict[str, str]:
    progress = _read_json(folder / PROGRESS_FILE)
    recorded = progress.get("completed", {}) if progress.get("plan") == key else {}
    sizes = {s.filename: s.size for s in shard_plan.shards}
    kept = {}
    for filename, digest in recorded.items():
        path = folder / filename
        if filename in sizes and path.exists() and path.stat().st_size == sizes[filename] and sha256_file(path) == digest:
            kept[filename] = digest
        else:
            path.unlink(missing_ok=True)  # damaged or foreign: merged again
    for stray in folder.glob(".*.partial"):
        stray.unlink()
    return kept


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
