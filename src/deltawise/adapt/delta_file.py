"""The deltawise delta folder: what our own methods (HFT, LIFT, SORSA, LoLDU, KaSA) save.

A delta folder holds ``delta.safetensors`` and ``deltawise_delta.json``. Each adapted weight
``W`` of the base model gets one entry, ``W_new = W_base + ΔW``, of one of four kinds:

- ``dense``:   ``{name}::dense``                       ΔW stored whole;
- ``lowrank``: ``{name}::left`` (out×k), ``{name}::right`` (k×in)   ΔW = left @ right;
- ``sparse``:  ``{name}::index`` (int64 flat indices), ``{name}::values``   ΔW.flatten()[index] = values;
- ``replace``: ``{name}::value``                       W_new = value (a new classification head).

Applying is exact up to float32 rounding; computing in float32 and casting back is the rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deltawise.errors import InputError

FORMAT = "deltawise.delta/1"
META_FILE = "deltawise_delta.json"
TENSOR_FILE = "delta.safetensors"


@dataclass
class DeltaEntry:
    kind: str  # dense | lowrank | sparse | replace
    tensors: dict[str, torch.Tensor]

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the new weight (float32 arithmetic, cast back to the weight's dtype)."""
        w = weight.detach().float()
        t = {k: v.float() if v.is_floating_point() else v for k, v in self.tensors.items()}
        if self.kind == "dense":
            new = w + t["dense"]
        elif self.kind == "lowrank":
            new = w + t["left"] @ t["right"]
        elif self.kind == "sparse":
            new = w.clone().view(-1)
            new[t["index"]] += t["values"]
            new = new.view_as(w)
        elif self.kind == "replace":
            new = t["value"]
        else:
            raise InputError(f"unknown delta kind {self.kind!r}")
        if new.shape != weight.shape:
            raise InputError(f"delta shape {tuple(new.shape)} does not match weight shape {tuple(weight.shape)}")
        return new.to(weight.dtype)


def save_delta(out: Path, entries: dict[str, DeltaEntry], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    flat = {f"{name}::{part}": t.detach().contiguous().cpu() for name, e in entries.items() for part, t in e.tensors.items()}
    save_file(flat, out / TENSOR_FILE, metadata={"format": "pt"})
    info = {"format": FORMAT, **meta, "tensors": {name: e.kind for name, e in entries.items()}}
    (out / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))


def load_delta(folder: Path) -> tuple[dict[str, DeltaEntry], dict[str, Any]]:
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise InputError(f"{folder} is not a deltawise delta folder (no {META_FILE})")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise InputError(f"{folder}: unsupported delta format {meta.get('format')!r}")
    flat = load_file(folder / TENSOR_FILE)
    entries = {name: DeltaEntry(kind, {}) for name, kind in meta["tensors"].items()}
    for key, t in flat.items():
        name, _, part = key.rpartition("::")
        entries[name].tensors[part] = t
    return entries, meta


@torch.no_grad()
def apply_delta(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Add the delta in ``folder`` to ``model``'s parameters in place; return the model."""
    entries, _ = load_delta(folder)
    params = dict(model.named_parameters())
    missing = sorted(set(entries) - set(params))
    if missing:
        raise InputError(f"delta names parameters the model does not have: {missing[:5]}")
    for name, entry in entries.items():
        params[name].copy_(entry.apply(params[name]))
    return model
