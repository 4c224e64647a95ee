"""What every search under a retention budget shares (``budget``, ``repair``, ``lr-sweep``): the budgets,
the targets, the selection/held-out splits, how points are scored, the intervals, and how the search
reports back.

    retention_s = ratio of source s against the baseline (ppl_base / ppl, acc / acc_base)
    a point is feasible when the one-sided lower bound of every retention_s clears its budget

The budgets and the targets are the two required arguments; the rest are keyword-only, so that each
search's own options (``BudgetOptions``, ``RepairOptions``, ``SweepOptions``) follow them in any order.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

from deltawise.errors import InputError
from deltawise.eval.runner import EvalOptions
from deltawise.options import IntervalOptions, SplitOptions
from deltawise.search.splits import Split, budget_splits

Note = Callable[[str], None]
Progress = Callable[[str, int, int], None]  # (what is counted, done, total)


@dataclass(frozen=True)
class RetentionBudget:
    data: Path
    minimum: float

    @classmethod
    def parse(cls, text: str) -> "RetentionBudget":
        """``SOURCE:0.98``: the data file and the smallest acceptable retention."""
        path, sep, value = text.rpartition(":")
        try:
            minimum = float(value)
        except ValueError:
            minimum = None
        if not sep or not path or minimum is None or not math.isfinite(minimum) or minimum <= 0:
            raise InputError(f"--retain takes SOURCE:MIN_RETENTION with a positive number, e.g. en.jsonl:0.98; got {text!r}")
        return cls(Path(path), minimum)


@dataclass
class BudgetedOptions:
    retain: list[RetentionBudget]
    targets: list[Path]
    _: KW_ONLY
    eval: EvalOptions = field(default_factory=EvalOptions)
    split: SplitOptions = field(default_factory=SplitOptions)  # the seeded selection/held-out cut
    heldout_retain: list[Path] = field(default_factory=list)  # one per --retain, instead of cutting
    heldout_targets: list[Path] = field(default_factory=list)  # one per --target
    intervals: IntervalOptions = field(default_factory=IntervalOptions)
    note: Optional[Note] = None
    progress: Optional[Progress] = None

    target_use: ClassVar[str] = "to maximise"  # what the targets are for, in the refusal below

    def check(self) -> None:
        """The refusals every budgeted search shares; a search adds its own after these."""
        if not self.retain:
            raise InputError("give at least one --retain SOURCE:MIN_RETENTION")
        if not self.targets:
            raise InputError(f"give at least one --target dataset {self.target_use}")

    def splits(self, folder: Path) -> list[Split]:
        """The retain files' then the target files' selection/held-out splits, written under ``folder``."""
        return budget_splits([b.data for b in self.retain], self.targets, self.heldout_retain, self.heldout_targets,
                             self.split.heldout_fraction, self.split.split_seed, folder)
