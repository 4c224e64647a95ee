"""Patch transfer (Lin et al. 2025, arXiv 2503.20110; PortLLM, arXiv 2410.10870): checks and a drift report
when a delta moves to a new base.

A delta extracted from base A can be applied to a new base N of the same architecture
(``θ̂ = N + Δ``, fine-tuning transfer / PortLLM). Before writing anything we check tensor
names and shapes; we warn when N's fingerprint differs from the one the delta recorded; and,
when A is at hand, we report per changed tensor how far N moved from A — the cosine of the
two weight tensors and the relative distance ``‖N − A‖ / ‖A‖`` — because transfer works when
the bases are close (linearly connected) and degrades as they drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


from deltawise.architecture import architecture_for
from deltawise.delta.source import DeltaSource
from deltawise.errors import InputError, bullet_list
from deltawise.io.reader import ModelReader


@dataclass
class DriftRow:
    name: str
    cosine: float
    relative_distance: float


def compatibility_problems(source: DeltaSource, base: ModelReader) -> list[str]:
    """Tensor names and shapes of the delta against a base, and the architecture when recorded."""
    problems = []
    recorded = (source.base.get("config") or {}).get("architectures")
    actual = (base.config or {}).get("architectures")
    if recorded and actual and list(recorded) != list(actual):
        problems.append(f"the delta is for {', '.join(recorded)}, the base is {', '.join(actual)}")
    roles = architecture_for(base.config)
    for name in source.names():
        alias = roles.tied_alias(name, base) if name not in base else None
        if alias is not None:  # an output head tied to the input embedding: the change goes through the tie
            shape, want = tuple(source.shape(name)), tuple(base.info(alias).shape)
            if shape != want:
                problems.append(f"{name} (tied to {alias}) has shape {list(shape)} in the delta, {list(want)} in the base")
            continue
        if name not in base:
            if source.kind(name) != "full":  # a full entry may add a tensor (a new classification head)
                problems.append(f"the base has no tensor {name!r}")
            continue
        if source.kind(name) == "spectral":
            continue  # FourierFT stores no shape of its own: it takes the base's
        shape, want = tuple(source.shape(name)), tuple(base.info(name).shape)
        if shape != want:
            problems.append(f"{name} has shape {list(shape)} in the delta, {list(want)} in the base")
    return problems


def check_transfer(source: DeltaSource, base: ModelReader, label: str, *, hint: bool = True) -> list[str]:
    """Raise on a delta that cannot apply to ``base``; return warnings for one that can."""
    problems = compatibility_problems(source, base)
    if problems:
        raise InputError(f"the delta {source.folder} does not fit {label}:\n" + bullet_list(problems))
    recorded = source.base.get("fingerprint")
    if recorded and recorded != base.fingerprint():
        was = source.base.get("label") or source.base.get("ref") or "another model"
        advice = " (pass --original-base to see how far the bases are apart)" if hint else ""
        return [f"the delta was made from {was}, whose weights differ from {label}: this is a transfer to a new base{advice}"]
    return []


def drift_report(source: DeltaSource, new_base: ModelReader, original: ModelReader) -> tuple[list[DriftRow], list[str]]:
    problems = compatibility_problems(source, original)
    if problems:
        raise InputError("--original-base does not fit the delta:\n" + bullet_list(problems))
    warnings = []
    recorded = source.base.get("fingerprint")
    if recorded and recorded != original.fingerprint():
        warnings.append(f"--original-base {original.label!r} is not the model the delta recorded as its base")
    rows = []
    for name in source.names():
        if name not in new_base or name not in original:
            continue  # a tensor the delta adds: there is nothing to compare
        n, a = new_base.get(name).double().reshape(-1), original.get(name).double().reshape(-1)
        norm_a, norm_n = float(a.norm()), float(n.norm())
        cosine = float(n @ a) / (norm_a * norm_n) if norm_a and norm_n else float("nan")
        distance = float((n - a).norm()) / norm_a if norm_a else float("inf")
        rows.append(DriftRow(name, cosine, distance))
    return rows, warnings


def summarize_drift(rows: list[DriftRow]) -> dict[str, Optional[float]]:
    if not rows:
        return {"min_cosine": None, "max_relative_distance": None}
    return {"min_cosine": min(r.cosine for r in rows), "max_relative_distance": max(r.relative_distance for r in rows)}
