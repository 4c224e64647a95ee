"""Write a statistics file (Fisher, Gram): safetensors with string metadata, atomically.

The file goes to a hidden ``.NAME.partial`` beside the target and is renamed into place once
complete, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from deltawise.errors import InputError, OutputError


def check_stats_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """A .safetensors file outside every input model folder (a loose shard there would be read as weights)."""
    if out.suffix != ".safetensors":
        raise OutputError(f"output {out} must end with .safetensors")
    target = Path(os.path.realpath(out))
    for folder in inputs:
        src = Path(os.path.realpath(folder))
        if src.is_dir() and (src == target.parent or src in target.parents):
            raise OutputError(f"output {out} is inside the model folder {folder}; write it elsewhere")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise OutputError(f"cannot create {out}: {target.parent} does not exist")


def save_stats(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    tmp = out.with_name(f".{out.name}.partial")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a statistics file, JSON values decoded."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from None
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
