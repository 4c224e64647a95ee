"""``deltawise extract FT --base BASE``: the task vector ``τ = θ_ft − θ_base`` as a dense delta.

Precision: by default (``dtype="auto"``) each tensor's delta is stored one step wider than the
fine-tuned weights (bfloat16/float16 → float32, float32 → float64). The difference of two
numbers is then exact, and so is ``base + τ`` cast back, so extract → apply returns the
fine-tuned weights bit for bit. Pass ``dtype="float32"`` (or bfloat16) to halve the size
when exactness does not matter. Tensors that did not change are not stored.

A NaN or inf in either model, or a difference too large for the delta's dtype, is refused with the
tensor's name; base tensors the fine-tuned model lacks are listed in a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from deltawise.delta.dense import DenseDelta
from deltawise.delta.report import DeltaResult, Progress, TensorRow, tick
from deltawise.delta.store import DeltaWriter, base_identity
from deltawise.delta.walk import open_pair
from deltawise.errors import DeltawiseError
from deltawise.io.dtypes import parse_dtype
from deltawise.io.finite import all_finite

WIDER = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float64, torch.float64: torch.float64}


def delta_dtype(choice: str, stored: torch.dtype) -> torch.dtype:
    return WIDER.get(stored, torch.float32) if choice == "auto" else parse_dtype(choice)


def extract_delta(finetuned: str, base: str, out: Path, *, dtype: str = "auto", overwrite: bool = False,
                  progress: Optional[Progress] = None) -> DeltaResult:
    pair = open_pair(finetuned, base)
    header = {
        "method": "extract", "parameters": {"dtype": dtype},
        "base": base_identity(pair.base),
        "finetuned": {"label": finetuned, "fingerprint": pair.finetuned.fingerprint()},
    }
    inputs = [(base, f) for f in pair.base.input_folders()] + [(finetuned, f) for f in pair.finetuned.input_folders()]
    rows: list[TensorRow] = []
    total = sum(pair.finetuned.info(n).nbytes for n in pair.names)
    done = 0
    with DeltaWriter(Path(out), header, inputs, overwrite=overwrite) as writer:
        for name, b, ft in pair.tensors():
            wide = delta_dtype(dtype, ft.dtype)
            work = torch.float64 if wide == torch.float64 else torch.float32
            tau = (ft.to(work) - b.to(work)).to(wide)
            if not all_finite(tau):  # the inputs are finite (pair.tensors checks): the difference overflowed
                raise DeltawiseError(f"the delta of tensor {name!r} overflows {str(wide).replace('torch.', '')}; "
                                     "pass a wider --dtype (e.g. float64)")
            done += pair.finetuned.info(name).nbytes
            tick(progress, "extracting", done, total)
            if not bool(tau.any()):
                continue
            delta = DenseDelta(tau)
            writer.add(name, delta, b.dtype)
            rows.append(TensorRow(name, delta.kind, b.numel() * b.element_size(), delta.nbytes))
        writer.finish()
    warnings = [f"{n} is not floating point and differs from the base; apply copies the base's value" for n in pair.skipped]
    warnings += pair.missing_warning()
    return DeltaResult(Path(out), rows, warnings, {"changed_tensors": len(rows), "tensors": len(pair.names)})
