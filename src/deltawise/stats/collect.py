"""Shared set-up of the commands that run one model over data to collect statistics (fisher, gram)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from deltawise.data.tasks import TaskData, encode, head_for, load_data
from deltawise.stats.statsfile import check_stats_output, save_stats
from deltawise.eval.models import LoadedModel, load_model
from deltawise.delta.reader import open_model
from deltawise.io.reader import ModelReader

Progress = Callable[[int, int], None]


@dataclass
class CollectOptions:
    task: str = "auto"  # auto | classification | causal_lm
    max_examples: Optional[int] = None
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False
    progress: Optional[Progress] = None
    trust_remote_code: bool = False  # run Python code shipped in a model folder (--trust-remote-code)


@dataclass
class CollectRun:
    """A loaded model, its data as token rows, and the reader of its files (for tensor names)."""

    lm: LoadedModel
    data: TaskData
    rows: list[dict]
    reader: ModelReader
    started: float = field(default_factory=time.time)

    def metadata(self, kind: str, **extra: Any) -> dict[str, Any]:
        return {"deltawise_statistics": kind, "task": self.data.task, "examples": len(self.rows), "model": str(self.lm.path),
                "model_fingerprint": self.lm.fingerprint, "data": str(self.data.path), **extra}


def start(model: str, data: Path, out: Path, options: CollectOptions, *, need_labels: bool = False) -> CollectRun:
    task_data = load_data(data, options.task, need_labels=need_labels, limit=options.max_examples)
    lm = load_model(model, head_for(task_data.task), device=options.device, trust_remote_code=options.trust_remote_code)
    check_stats_output(out, [lm.path], options.overwrite)
    rows = encode(lm, task_data, options.max_length)
    return CollectRun(lm, task_data, rows, open_model(str(lm.path)))


def finish(run: CollectRun, out: Path, tensors: dict, metadata: dict[str, Any]) -> float:
    """Write the statistics file; returns the seconds the run took."""
    save_stats(out, tensors, metadata)
    run.reader.close()
    return time.time() - run.started
