"""Open anything that holds a delta: a deltawise delta folder or a PEFT adapter folder.

Both give a *delta source*: ``names()``, ``shape(name)``, ``get(name) -> TensorDelta``,
``base`` (the recorded base: ``ref``, and when known ``fingerprint`` and ``config``),
``header``, ``files``, ``folder`` and ``fingerprint()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from deltawise.delta.peft_io import PeftAdapter, is_peft_adapter
from deltawise.delta.store import DeltaFile, is_delta_folder
from deltawise.errors import InputError
from deltawise.io.reader import ModelReader

DeltaSource = Union[DeltaFile, PeftAdapter]


def is_delta(path: Path) -> bool:
    return is_delta_folder(path) or is_peft_adapter(path)


def open_delta(path: Path, *, task: Optional[str] = None, base_reader: Optional[ModelReader] = None) -> DeltaSource:
    path = Path(path)
    if is_delta_folder(path):
        return DeltaFile(path, task=task)
    if is_peft_adapter(path):
        if task is not None:
            raise InputError(f"{path} is a PEFT adapter, which holds one task; drop --task")
        return PeftAdapter(path, base_reader)
    raise InputError(f"{path} is neither a deltawise delta folder (delta.json) nor a PEFT adapter (adapter_config.json)")
