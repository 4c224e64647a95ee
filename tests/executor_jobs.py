"""Job functions and job parts for the executor tests, importable by spawned worker processes (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass, field


def square_or_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative input {x}")
    return x * x


@dataclass
class DistanceScorer:
    """A stand-in for benchmarks/minilm_tasks.Scorer: task t's accuracy of a body is 1 / (1 + L1 distance of its
    weight ``w`` to ``tasks[t]``), its items are the signs of ``w - tasks[t]`` (picklable, for spawned workers)."""

    tasks: dict[str, list[float]]
    _models: dict = field(default_factory=dict)
    _inputs: dict = field(default_factory=dict)

    def scores(self, body, split: str) -> dict[str, float]:
        return {t: 1.0 / (1.0 + sum(abs(a - b) for a, b in zip(body["w"].tolist(), target)))
                for t, target in self.tasks.items()}

    def correct(self, body, task: str, split: str) -> list[int]:
        return [int(a >= b) for a, b in zip(body["w"].tolist(), self.tasks[task])]
