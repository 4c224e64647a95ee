"""Per-tensor results of extract/compress/apply, shared by the CLI tables and JSON reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

Progress = Callable[[str, int, int], None]  # (stage, done, total), as the merge engine reports


@dataclass
class TensorRow:
    name: str
    kind: str
    dense_bytes: int  # the delta stored densely in the base dtype
    stored_bytes: int
    error: Optional[float] = None  # relative Frobenius error ‖approx − exact‖ / ‖exact‖
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.stored_bytes if self.stored_bytes else float("inf")


@dataclass
class DeltaResult:
    out: Path
    rows: list[TensorRow]
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    drift: list[Any] = field(default_factory=list)  # transfer.DriftRow per tensor, for apply --original-base

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.rows)

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "dense_bytes": self.dense_bytes, "stored_bytes": self.stored_bytes,
            "ratio": self.dense_bytes / self.stored_bytes if self.stored_bytes else None,
            "summary": self.summary, "warnings": self.warnings, "drift": [asdict(d) for d in self.drift],
            "tensors": [{**asdict(r), "ratio": r.ratio} for r in self.rows],
        }


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    norm = float(exact.double().norm())
    diff = float((approx.double() - exact.double()).norm())
    return diff / norm if norm > 0 else diff


def tick(progress: Optional[Progress], stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)
