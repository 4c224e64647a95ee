"""Benchmark results kept in the repository (``benchmarks/records/``), so that a benchmark longer than one session
spans sessions even on machines that keep nothing between them: the work folder (``bench-work/``) holds what is
large and can be rebuilt (data, experts, merged models), the record holds what a finished row costs hours to
recompute (its chosen parameters, scores and per-item test scores, which the paired intervals need).

A record is one JSON file per benchmark and seed (``seed-N.json``; or per unit of work, as the long language-transfer
benchmark's runs: ``record_file``), written atomically after every finished row. It carries the
settings it was computed with; a run with other settings neither uses nor overwrites it. What a record's rows were
computed on (the seed's experts) must be what the rest of the seed is computed on: the script that resumes from a
record checks that before mixing (``keep_experts``: the retrained experts must score as the record's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Optional

RECORDS = Path(__file__).resolve().parent / "records"


def record_file(benchmark: str, name: str, root: Optional[Path] = None) -> Path:
    return (root or RECORDS) / benchmark / f"{name}.json"


def record_path(benchmark: str, seed: int, root: Optional[Path] = None) -> Path:
    return record_file(benchmark, f"seed-{seed}", root)


def add_record_argument(ap: argparse.ArgumentParser, text: str = "keep results only in --work, not in the seed's record in "
                                                                  "benchmarks/records/ (always so with --quick)") -> None:
    ap.add_argument("--no-record", action="store_true", help=text)


def open_record(benchmark: str, seed: int, settings: dict, args, say: Callable[[str], None] = print
                ) -> tuple[Optional[Path], Optional[dict]]:
    """The seed's record to write after each row, and what it holds when it was made with ``settings``. No record
    with ``--no-record`` or ``--quick``; none to write when the file was made with other settings (another run's:
    neither used nor overwritten, said)."""
    if args.no_record or args.quick:
        return None, None
    path = record_path(benchmark, seed)
    recorded = load_record(path, settings, say)
    if recorded is None and path.is_file():
        return None, None
    return path, recorded


def record_behind(path: Optional[Path], settings: dict, payload: dict) -> bool:
    """The record to write lacks what the work folder holds (computed before the record existed, or on a machine
    that kept the folder): a finished seed then writes its record without computing anything."""
    return path is not None and load_record(path, settings) != payload


def shown(path: Path) -> str:
    """``records/<benchmark>/seed-N.json``: how a record is named in messages."""
    return str(path.relative_to(path.parents[2]))


def other_experts(seed: int, here, recorded, where: str) -> SystemExit:
    """The refusal when a seed's retrained experts are not those its cached or recorded rows were computed with."""
    return SystemExit(f"seed {seed}: the experts trained here differ from those its cached or recorded rows were computed "
                      f"with ({here} against {recorded}); their rows cannot be mixed with new ones. Move {where} away to "
                      f"compute the seed afresh")


def keep_experts(payload: dict, experts: dict, seed: int, where: str, described: Optional[tuple[str, str]] = None
                 ) -> bool:
    """Stores a seed's experts' scores in ``payload`` when it holds none yet (True: the caller adds what goes with
    them); otherwise refuses (``other_experts``) when they differ from those it holds, whose rows were computed on
    other experts. ``described`` names the two in the refusal (default: the test accuracies themselves; per-item
    scores are too long to print); ``where`` is what to move away to start the seed afresh."""
    if "experts" not in payload:
        payload["experts"] = experts
        return True
    if payload["experts"] != experts:
        here, recorded = described or (f"test accuracy {experts}", payload["experts"])
        raise other_experts(seed, here, recorded, where)
    return False


def differences(recorded: dict, here: dict, notes: Optional[dict[str, str]] = None) -> str:
    """``name recorded, here value`` for each setting that differs, and the ``notes`` of those settings (why a
    difference matters, where that is not plain)."""
    changed = sorted(key for key in set(recorded) | set(here) if recorded.get(key) != here.get(key))
    said = "; ".join(f"{key} {recorded.get(key)!r}, here {here.get(key)!r}" for key in changed)
    return said + "".join(f" ({notes[key]})" for key in changed if notes and key in notes)


def load_record(path: Path, settings: dict, say=print, notes: Optional[dict[str, str]] = None) -> Optional[dict]:
    """The record at ``path`` when it was computed with ``settings``; None when there is none or it differs (said,
    naming the settings that differ; ``notes``: see ``differences``)."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("settings") != settings:
        say(f"record {path} was computed with other settings ({differences(record.get('settings') or {}, settings, notes)}); "
            "not used, not overwritten")
        return None
    return record


def save_record(path: Path, payload: dict) -> None:
    """Compact JSON (per-item scores make indented files long), written atomically."""
    from deltawise.io.writer import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, separators=(",", ":"), sort_keys=True) + "\n")
