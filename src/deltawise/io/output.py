"""Safe outputs: refuse outputs that touch an input, one writer at a time, build in a staging folder, swap in.

The one source of the output rules (docs/safety.md, "Outputs"), shared by every command:

- an output folder (merge, apply, extract, compress, train, soup, atlas) that is, contains or sits
  inside an input's folder is refused (``check_output_folder``); so is a single-file output (result
  JSON, report, HTML page, statistics file) that is an input file or lies inside an input's folder
  (``check_output_file``);
- a non-empty output is replaced only when asked, and only once the new one is complete; a partial
  result never appears under the final name (``staged_output``, ``write_text_atomic``);
- one run writes an output at a time: ``output_lock`` holds an OS lock (``fcntl.flock``) on a
  hidden lock file beside it for the whole run; the OS drops it when the process ends, however it ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from deltawise.errors import OutputError

STAGING_MARK = ".deltawise-staging"
MANIFEST = "deltawise_merge.json"  # what a merge output records: recipe, inputs, shard sha256


def human_size(n: float) -> str:
    """``14_000_000`` -> ``"14.0 MB"``: disk-space messages stay readable from bytes to terabytes."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_output_folder(out: Path, inputs: list[tuple[str, Path]], overwrite: bool, need_bytes: int = 0) -> None:
    """Refuse an output folder that touches an input, is not empty (without ``overwrite``), or does not fit.

    ``inputs``: (label, folder) of everything the command reads. ``need_bytes``: what is still to
    be written (a resumed merge counts only the shards it has left)."""
    target = Path(os.path.realpath(out))
    for label, folder in inputs:
        src = Path(os.path.realpath(folder))
        if target == src or target in src.parents:
            raise OutputError(f"output {out} would overwrite input {label!r} ({src}); choose another folder")
        if src in target.parents:
            raise OutputError(f"output {out} is inside the folder of input {label!r} ({src}); choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out} is not empty; pass --overwrite to replace it once the new one is complete")
    parent = target.parent
    if not parent.exists():
        raise OutputError(f"cannot create {out}: {parent} does not exist")
    check_free_space(out, parent, need_bytes)


def check_free_space(out: Path, folder: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise OutputError(f"not enough disk space for {out}: needs {human_size(need_bytes)}, {human_size(free)} free")


def check_output_file(out: Path, inputs: Iterable[tuple[str, Optional[Path]]], *, overwrite: bool = True,
                      outputs: Iterable[Optional[Path]] = ()) -> None:
    """Refuse a single-file output (result JSON, report, page) that would overwrite or sit inside an input.

    ``inputs``: (label, path) of everything the command reads, files or folders (``None`` is
    skipped); ``outputs``: the command's other outputs, which the file may sit in but not replace.
    The output may not be an input file, nor lie inside an input folder (``-o model/config.json``
    would leave a model that no longer loads), nor be a folder; its folder must exist. Without
    ``overwrite`` an existing file is refused too. The file itself is written with
    ``write_text_atomic`` (a reader never sees half of it)."""
    target = Path(os.path.realpath(out))
    for other in outputs:
        if other is not None and Path(os.path.realpath(other)) == target:
            raise OutputError(f"output {out} is also the command's output {other}; give them different paths")
    for label, path in inputs:
        if path is None:
            continue
        src = Path(os.path.realpath(path))
        if target == src:
            raise OutputError(f"output {out} is the input {label!r} ({src}); choose another file")
        if src.is_dir() and src in target.parents:
            raise OutputError(f"output {out} is inside the {label} folder {src}, an input; write it outside that folder")
    if target.is_dir():
        raise OutputError(f"output {out} is a folder; give a file name")
    if not target.parent.is_dir():
        raise OutputError(f"cannot create {out}: {target.parent} does not exist")
    if target.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it")


def lock_path(out: Path) -> Path:
    """The hidden lock file beside ``out``; an exclusive holder removes it when done (shared holders leave it)."""
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: Path, what: str = "output", *, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive OS lock on ``out`` for the block; a second run on the same path is refused.

    ``fcntl.flock`` locks belong to the open file and vanish when the process ends (exit, crash,
    kill -9), so a stale lock file never blocks a later run. The holder writes its pid into the
    file for the refusal message, and removes the file while still holding the lock; a process
    that locked a file already unlinked sees that the path now names another file and retries.
    ``shared``: many shared holders may run together (BaM's parallel ``--branch-index`` runs in one
    work folder), but not beside an exclusive one; they leave the file in place for each other."""
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise OutputError(f"cannot create {out}: {out.parent} does not exist") from None
        except OSError as exc:
            raise unwritable(out, exc) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise OutputError(f"another deltawise run ({who}) is writing the {what} {out}; wait for it to end, or "
                              f"choose another {what}") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed this file between our open and our lock
    try:
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            if not shared:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def unwritable(out: Path, exc: OSError) -> OutputError:
    """A clear message for an output location the OS will not let us write (read-only, no permission)."""
    if exc.errno == errno.EROFS:
        return OutputError(f"cannot write {out}: {out.parent} is on a read-only file system; choose another output")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {out}: no permission to write in {out.parent}")
    if exc.errno == errno.ENOSPC:
        return OutputError(f"cannot write {out}: the disk is full")
    return OutputError(f"cannot write {out}: {exc.strerror or exc}")


def staging_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.deltawise-partial"


def prepare_staging(out: Path) -> Path:
    staging = staging_folder(out)
    if staging.exists():
        if not (staging / STAGING_MARK).exists():
            raise OutputError(f"{staging} exists and was not made by deltawise; remove it and retry")
        shutil.rmtree(staging)  # a previous run's leftovers (the caller holds the output's lock)
    try:
        staging.mkdir()
        (staging / STAGING_MARK).write_text("deltawise output in progress\n")
    except OSError as exc:
        raise unwritable(out, exc) from None
    return staging


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to OUT; an existing OUT (--overwrite) is removed only after."""
    (staging / STAGING_MARK).unlink(missing_ok=True)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.deltawise-old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(out: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it becomes OUT, on any error it is removed.
    OUT is locked (``output_lock``) until then. Without ``overwrite``, OUT is checked again once the
    lock is held: a run that finished between this command's first check and its lock is not replaced."""
    with output_lock(out):
        if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise OutputError(f"output {out} was written by another run meanwhile; pass --overwrite to replace it")
        staging = prepare_staging(out)
        try:
            yield staging
            swap_into_place(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
