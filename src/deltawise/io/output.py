"""Safe output folders: refuse outputs that touch an input, build in a staging folder, swap in.

Shared by every command that writes a model or a delta (merge, apply, extract, compress), so
that all of them follow the same rules: an output that is, contains or sits inside an input's
folder is refused; a non-empty output is replaced only when asked, and only once the new one is
complete; a partial result never appears under the final name.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deltawise.errors import OutputError

STAGING_MARK = ".deltawise-staging"
MANIFEST = "deltawise_merge.json"  # what a merge output records: recipe, inputs, shard sha256


def check_output_folder(out: Path, inputs: list[tuple[str, Path]], overwrite: bool, need_bytes: int = 0) -> None:
    """``inputs``: (label, folder) of everything the command reads."""
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
    free = shutil.disk_usage(parent).free
    if need_bytes > free:
        raise OutputError(f"not enough disk space for {out}: needs {need_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


def staging_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.deltawise-partial"


def prepare_staging(out: Path) -> Path:
    staging = staging_folder(out)
    if staging.exists():
        if not (staging / STAGING_MARK).exists():
            raise OutputError(f"{staging} exists and was not made by deltawise; remove it and retry")
        shutil.rmtree(staging)  # a previous run's leftovers (resume is not implemented yet)
    staging.mkdir()
    (staging / STAGING_MARK).write_text("deltawise output in progress\n")
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
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it becomes OUT, on any error it is removed."""
    staging = prepare_staging(out)
    try:
        yield staging
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
