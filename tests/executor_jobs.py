"""Job functions for tests/test_bam_executors.py, importable by spawned worker processes (no heavy imports)."""

from __future__ import annotations


def square_or_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative input {x}")
    return x * x
