"""The staging folder of a training run, its checkpoints, and ``--resume``.

A run trains into ``.OUT.deltawise-partial`` beside OUT (``deltawise.io.output.staging_folder``) and
renames it into place when it succeeds. With ``--save-every N``, Trainer keeps its latest checkpoint
there (``_trainer/checkpoint-STEP``: the trained weights, optimizer, LR schedule, RNG states, the log so
far) plus the method's own state (``METHOD_STATE``: e.g. LIFT's masks) and a callback's (the retention
guard's checks and kept weights, adapt/guard_resume.py); after an interruption the folder
stays, and ``--resume`` continues from that checkpoint. The run file records a key of everything that
determines the result (options, model fingerprint, data sha256, the launch's process count), so a resume with
other options, changed data or another launch is refused, naming what changed.

Continuing from a checkpoint reproduces the uninterrupted run exactly for a fixed seed on the same
machine: Trainer restores the RNG states and skips the batches already seen in the current epoch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from deltawise.errors import OutputError
from deltawise.io.output import STAGING_MARK, prepare_staging, staging_folder
from deltawise.io.writer import write_json_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

    from deltawise.adapt.methods import Method
    from deltawise.adapt.train import TrainConfig

RUN_FILE = ".deltawise-train.json"
TRAINER_DIR = "_trainer"  # Trainer's output_dir inside the staging folder: its checkpoints
METHOD_STATE = "deltawise_method_state.safetensors"
# what changes no result: where it is written, how it is reported, the permission to load a format,
# how often a checkpoint is kept, and the loss-free evaluation settings
NOT_IN_KEY = ("model", "data", "output", "overwrite", "progress", "trust_remote_code", "allow_pickle", "save_every",
              "resume", "replay", "eval_data", "eval_every", "logging_steps")


def data_sha256(path: Optional[Path]) -> Optional[str]:
    """SHA-256 of a data file, or of a `datasets` folder's files (names and contents, sorted)."""
    if path is None:
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        h.update(file.relative_to(path).as_posix().encode() + b"\0" if file != path else b"")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def run_key(cfg: TrainConfig, method_values: dict[str, Any], model_fingerprint: str,
            init_batch_rows: Optional[int] = None, sharded: bool = False, processes: int = 1) -> dict[str, Any]:
    """Everything the trained result depends on, as JSON-able parts (compared part by part on resume).
    ``init_batch_rows``: the rows of each batch a data-driven initialisation (LoRA's init=eva) reads, processes ×
    --batch-size, which is not among the options; a part of the key only for such a method. ``sharded``: the run
    trains under FSDP, whose checkpoints only an FSDP launch can load (the Trainer's own error would come after
    the model is loaded); a part of the key only when true, so unsharded runs keep the key they had.
    ``processes``: the launch's process count (--batch-size is per process). Not only the global batch depends on
    it: each process keeps its own RNG state in the checkpoint, the last batch of an epoch is filled up per process,
    the replay mix is drawn per process batch, and FSDP checkpoints hold per-process shards; so even the same global
    batch (2 × 4 then, 1 × 8 now) is another run (docs/adapt.md, "Several processes"). A part of the key
    only above one process, so one-process keys stay as they were."""
    options = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY}
    options["method_params"] = method_values  # resolved: giving a parameter its default is the same run
    key = {
        "options": json.loads(json.dumps(options, default=str)),
        "model": model_fingerprint,
        "data": data_sha256(Path(cfg.data)),
        "replay": data_sha256(Path(cfg.replay) if cfg.replay else None),
    }
    if init_batch_rows is not None:
        key["init_batch_rows"] = init_batch_rows
    if sharded:
        key["sharding"] = "fsdp"
    if processes > 1:
        key["processes"] = processes
    return key


def checkpoint_processes(checkpoint: Path) -> int:
    """How many processes wrote a Trainer checkpoint: each of several writes its RNG state as rng_state_RANK.pth,
    a single one rng_state.pth."""
    ranks = [int(p.stem[len("rng_state_"):]) for p in checkpoint.glob("rng_state_*.pth") if p.stem[len("rng_state_"):].isdigit()]
    return max(ranks) + 1 if ranks else 1


def latest_checkpoint(staging: Path) -> Optional[Path]:
    """The checkpoint with the highest step that Trainer finished writing (its trainer_state.json is written last)."""
    trainer_dir = staging / TRAINER_DIR
    done = [p for p in trainer_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file()] if trainer_dir.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def interrupted_checkpoint(out: Path) -> Optional[Path]:
    """The checkpoint an interrupted run of ``out`` left to ``--resume`` from, or None (no such run, or none kept):
    what a caller that reruns a command until it finishes passes as ``resume=``."""
    folder = staging_folder(out)
    return latest_checkpoint(folder) if (folder / STAGING_MARK).exists() else None


def open_run_staging(out: Path, key: dict[str, Any], *, resume: bool) -> tuple[Path, Optional[Path]]:
    """The staging folder (fresh, or the interrupted one when resuming the same run) and the checkpoint to
    continue from. The caller holds the output's lock, so no other run uses the folder."""
    folder = staging_folder(out)
    if folder.exists():
        if not (folder / STAGING_MARK).exists():
            raise OutputError(f"{folder} exists and was not made by deltawise; remove it and retry")
        previous = _read_json(folder / RUN_FILE).get("key", {})
        checkpoint = latest_checkpoint(folder)
        if resume:
            if checkpoint is None:
                raise OutputError(f"nothing to resume: the interrupted run in {folder} kept no checkpoint "
                                  "(checkpoints are kept with --save-every N); rerun without --resume")
            if "processes" not in previous and (wrote := checkpoint_processes(checkpoint)) > 1:
                # a key written before it had the part: the checkpoint tells the run's process count
                previous = {**previous, "processes": wrote}
            changed = changed_parts(previous, key)
            if changed:
                raise OutputError(f"{folder} holds an interrupted run that differs in: {changed}; rerun it as it was, "
                                  "or remove the folder to start again")
            return folder, checkpoint
        if checkpoint is not None:
            raise OutputError(f"found an interrupted run in {folder} (checkpoint at step "
                              f"{checkpoint.name.split('-')[-1]}); pass --resume to continue it, or remove the folder "
                              "to start again")
    elif resume:
        raise OutputError(f"nothing to resume: no interrupted run of {out} ({folder} does not exist)")
    folder = prepare_staging(out)
    write_json_atomic(folder / RUN_FILE, {"key": key})
    return folder, None


def save_method_state(method: Method, checkpoint: Path) -> None:
    """Write the method's own state (``Method.resume_state``) into a checkpoint folder, when it has any. Each entry
    is copied: entries may share memory (LIFT's mask and its record of masked entries, before the first refresh),
    which safetensors refuses to write."""
    state = method.resume_state()
    if state:
        from safetensors.torch import save_file

        checkpoint.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, checkpoint / METHOD_STATE)


def load_method_state(method: Method, model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Hand the method what ``save_method_state`` wrote (nothing: an empty dict, for the method to refuse if it needs state)."""
    from safetensors.torch import load_file

    path = checkpoint / METHOD_STATE
    method.load_resume_state(model, optimizer, load_file(path) if path.is_file() else {})


def previous_records(checkpoint: Optional[Path]) -> list[dict[str, Any]]:
    """The training and evaluation log of the run up to ``checkpoint`` (Trainer keeps it in trainer_state.json)."""
    if checkpoint is None:
        return []
    history = json.loads((checkpoint / "trainer_state.json").read_text()).get("log_history", [])
    return [{"step": r["step"], **{k: v for k, v in r.items() if k != "step"}} for r in history
            if "step" in r and ("loss" in r or "eval_loss" in r)]


def checkpoint_step(checkpoint: Optional[Path]) -> Optional[int]:
    return int(checkpoint.name.split("-")[-1]) if checkpoint is not None else None


def discard_unless_resumable(staging: Path) -> bool:
    """After a failed run: keep the folder when it holds a checkpoint to resume from, else remove it.
    Returns whether it was kept."""
    if staging.exists() and latest_checkpoint(staging) is not None:
        return True
    shutil.rmtree(staging, ignore_errors=True)
    return False


def changed_parts(previous: dict[str, Any], key: dict[str, Any]) -> str:
    parts = []
    for name in sorted(set(previous) | set(key)):
        old, new = previous.get(name), key.get(name)
        if old == new:
            continue
        if name == "processes":
            parts.append(_launch_changed(previous, key))
        elif name == "options" and isinstance(old, dict) and isinstance(new, dict):
            parts += [f"--{k.replace('_', '-')}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif name == "guard" and isinstance(old, dict) and isinstance(new, dict):
            parts.append("the --retain guard's " + ", ".join(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)))
        else:
            parts.append({"model": "model weights", "data": "--data contents", "replay": "--replay contents",
                          "guard": "--retain (given to one run and not the other)",
                          "init_batch_rows": f"the rows of the initialisation's batches (processes × --batch-size: "
                                             f"{old} then, {new} now)",
                          "sharding": f"sharding ({'FSDP' if old else 'none'} then, {'FSDP' if new else 'none'} now: "
                                      f"resume with the launch configuration the run was started with)"}.get(name, name))
    return ", ".join(parts)


def _launch_changed(previous: dict[str, Any], key: dict[str, Any]) -> str:
    """The process counts and per-process batch sizes of the two launches, and how to resume (a missing part: one process)."""
    def launch(k: dict[str, Any]) -> tuple[int, Any]:
        return k.get("processes", 1), k.get("options", {}).get("batch_size", "?")

    (n_old, b_old), (n_new, b_new) = launch(previous), launch(key)
    was = f"{n_old} process{'es' if n_old > 1 else ''}"
    return (f"the launch ({was} × --batch-size {b_old} then, {n_new} × {b_new} now: resume with the launch the run was "
            f"started with, {was} × --batch-size {b_old})")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
