"""Records of the long language-transfer benchmark (language_transfer_long.py; records.py has the idea): what a finished
stage cost hours to compute, kept in the repository so the benchmark spans sessions on machines that keep no work folder.

One record per unit of work under ``benchmarks/records/language_transfer_long/``, so that machines working on
different runs never write the same file:

* ``base.json``: the base model's evaluation (``WORK/base.json``);
* ``pilot.json``: each evaluated pilot checkpoint (``WORK/pilot/results/step-NNNNN.json``) and, once the pilot has
  finished, its ``pilot.json`` (whose length is the main runs' ``--steps`` when its final checkpoint forgets);
* ``<run key>.json``: the run's ``eval.json`` (the evaluation with its per-item scores, which the paired intervals
  need), ``budget.json`` (the budget merge), ``seconds.json`` and, for a forgetting-budget row, its tool's record
  (``train/deltawise_guard.json``, ``repair.json`` or ``sweep.json``).

A record holds those files as the work folder has them (``files``, by their path in the unit's folder) and the
settings they were computed with (``settings``): everything a result depends on besides the unit's name. A unit's
record is copied into the work folder before the unit runs, so the folder's caching skips every recorded stage,
and the folder's files are written back after each finished stage. A record made with other settings is neither
used nor overwritten (said, naming what differs). Models are not recorded: a stage that needs a recorded run's model
(a budget merge missing from its record, a repair of it) trains the run again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lt_budget
import lt_methods
import records
from lt_methods import FULL, Data, Run, eval_options

BENCHMARK = "language_transfer_long"
VERSION = 1  # raise when a change of this benchmark's code changes its results in a way the settings below do not show
RUN_FILES = ("eval.json", "budget.json", "seconds.json", *lt_budget.TOOL_RECORDS.values())
WORK_SETTINGS = "settings.json"  # in a run's (or the pilot's) work folder: the settings its files were computed with
NOTES = {"data": "the sets are drawn with seed 0 from this machine's Debian and Python files (fortunes-de, WordNet, "
                 "stdlib docstrings, pydoc_data): a machine whose files draw other sets computes its own results, "
                 "never mixed with these"}


def data_fingerprint(data: Data) -> str:
    """sha256 over the seeded sets (evaluation, selection and training files, by name and content)."""
    digest = hashlib.sha256()
    for path in data.files():
        digest.update(f"{path.parent.name}/{path.name}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def device_kind(device: str) -> str:
    """The kind of device a result was computed on (``cpu``, ``cuda``): a GPU rounds differently from a CPU, so a
    seed's run on one is not the same result as on the other."""
    return device.split(":")[0]


def record_folder(kind: str) -> str:
    """Where results computed on ``kind`` are recorded, under benchmarks/records/: the CPU's in the benchmark's folder,
    another kind's in a folder of its own inside it, so the two are never mixed in one table."""
    return BENCHMARK if kind == "cpu" else f"{BENCHMARK}/{kind}"


def common_settings(base: str, data: Data, args) -> dict[str, Any]:
    """What every result depends on: the code's version, the base (``base.txt``'s name; SmolLM2's with the wheel it
    comes from), the sets, the scoring and the kind of device (``args.device``, resolved)."""
    from demo import WHEEL

    options = eval_options(args)
    return {"version": VERSION, "base": base if args.base else f"{base}, {WHEEL}", "data": data_fingerprint(data),
            "eval": {"max_length": options.max_length, "batch_size": options.batch_size, "mc_norm": options.mc_norm},
            "device": device_kind(args.device)}


def training(run: Run, args) -> dict[str, Any]:
    """The training settings lt_methods.settings gives ``run`` (rate, seed, batch, length, schedule, replay share),
    less the paths (the base and the sets are in ``common_settings``) and the progress display."""
    fields = lt_methods.settings(run, Path("."), Data(Path(".")), args)
    return {k: v for k, v in fields.items() if k not in ("model", "data", "replay", "progress", "overwrite")}


def pilot_seed(args) -> int:
    """The pilot trains with the first of ``--seeds`` (0 when none are given)."""
    return args.seeds[0] if args.seeds else 0


def pilot_settings(args) -> dict[str, Any]:
    return {"pilot": {"steps": args.pilot_steps, "every": args.pilot_every},
            "training": training(Run(FULL, args.pilot_lr, pilot_seed(args)), args)}


def run_settings(run: Run, args) -> dict[str, Any]:
    """What a run's result depends on besides ``common_settings`` and its key: its steps, training and method (the
    method's sweep and usual rate only decide which runs exist), and the options of the stages it has."""
    method = {k: v for k, v in asdict(run.method).items() if k not in ("label", "lrs", "usual")}
    if not method["refine"]:
        del method["refine"]  # a setting only where it is used: the records made before it keep their settings
    found = {"steps": args.steps, "training": training(run, args), "method": method}
    if run.budget:
        found["budget"] = args.budget
    if run.method.bam:
        found["bam_rounds"] = args.bam_rounds
    if run.method.tool:
        found["retain_budget"] = args.retain_budget
    if run.method.english_only:  # its text is drawn apart from the sets (lt_methods.english_fortunes)
        text = lt_methods.english_fortunes(Data(args.work / "data"))
        found["english_text"] = hashlib.sha256(text.read_bytes()).hexdigest()
    if run.method.tool == "lr-sweep":
        found["lr_sweep"] = {"steps": lt_budget.sweep_steps(args), "examples": args.lr_sweep_examples, "rates": run.method.lrs}
    return found


@dataclass(frozen=True)
class Unit:
    """A unit of work: its record's name, its folder in the work folder, its settings, the files it records there."""

    name: str
    folder: Path
    settings: dict
    files: tuple[str, ...]


@dataclass
class Book:
    """The records one invocation reads and writes. ``enabled`` is False with ``--no-record`` and with ``--base``
    (another model's results would take the SmolLM2 runs' file names): nothing is then read or written."""

    common: dict
    enabled: bool
    say: Callable[[str], None] = print
    refused: set = field(default_factory=set)  # records found made with other settings, said once each

    def unit(self, name: str, folder: Path, settings: dict, files: tuple[str, ...]) -> Unit:
        """``settings`` added to the common ones, as they read back from JSON (tuples become lists)."""
        return Unit(name, folder, json.loads(json.dumps({**self.common, **settings})), files)

    def path(self, unit: Unit) -> Path:
        return records.record_file(record_folder(self.common["device"]), unit.name)

    def _load(self, unit: Unit, same: Optional[list[str]] = None) -> Optional[dict]:
        path = self.path(unit)
        settings = unit.settings
        if same is not None and path.is_file():  # only these settings must be the unit's
            settings = {**json.loads(path.read_text())["settings"], **{key: unit.settings[key] for key in same}}
        say = (lambda message: None) if path in self.refused else self.say
        found = records.load_record(path, settings, say, NOTES)
        if found is None and path.is_file():
            self.refused.add(path)
        return found

    def recorded(self, unit: Unit, same: Optional[list[str]] = None) -> dict[str, Any]:
        """The unit's recorded files (empty: no record made with its settings, or records off); with ``same``, a
        record whose settings of those names are the unit's."""
        found = self._load(unit, same) if self.enabled else None
        return {} if found is None else {name: found["files"][name] for name in unit.files if name in found["files"]}

    @staticmethod
    def held_otherwise(unit: Unit) -> Optional[dict]:
        """The settings the unit's work folder was computed with, when they are not the unit's."""
        noted = unit.folder / WORK_SETTINGS
        held = json.loads(noted.read_text()) if noted.is_file() else unit.settings
        return None if held == unit.settings else held

    def claim(self, unit: Unit) -> None:
        """Notes the unit's settings in its work folder, or refuses a folder computed with other settings, whose files
        must not be mixed with new ones nor recorded as these settings' (a folder from before records were kept is
        taken to be this command's, as task_merging.py does)."""
        from deltawise.io.writer import write_json_atomic

        held = self.held_otherwise(unit)
        if held is not None:
            raise SystemExit(f"{unit.folder} holds results computed with other settings "
                             f"({records.differences(held, unit.settings, NOTES)}): move it away or use another --work")
        if not (unit.folder / WORK_SETTINGS).is_file():
            unit.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(unit.folder / WORK_SETTINGS, unit.settings)

    def restore(self, unit: Unit) -> None:
        """Copies the unit's recorded files into its work folder; a file the folder has otherwise is replaced by the
        record's (said): the record is what other machines have built on."""
        from deltawise.io.writer import write_json_atomic

        copied = []
        for name, content in self.recorded(unit).items():
            target = unit.folder / name
            if target.is_file():
                if json.loads(target.read_text()) == content:
                    continue
                self.say(f"{target} differs from {records.shown(self.path(unit))}: the record's replaces it")
            target.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(target, content)
            copied.append(name)
        if copied:
            self.say(f"{unit.name}: {', '.join(copied)} from {records.shown(self.path(unit))}")

    def keep(self, unit: Unit) -> None:
        """Writes the unit's files in its work folder into its record when the record lacks them (computed now, or
        before the record existed), unless the record was made with other settings."""
        if not self.enabled:
            return
        recorded = self._load(unit)
        if recorded is None and self.path(unit).is_file():
            return
        held = {name: json.loads((unit.folder / name).read_text()) for name in unit.files if (unit.folder / name).is_file()}
        files = {**(recorded or {}).get("files", {}), **held}
        if held and (recorded is None or recorded["files"] != files):
            records.save_record(self.path(unit), {"settings": unit.settings, "files": files})
