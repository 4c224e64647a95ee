"""Argument types shared by the benchmark scripts (``--seeds`` of task_merging.py, compression_accuracy.py,
continual_finetuning.py and language_transfer_long.py; ``--lrs`` of language_transfer_long.py)."""

from __future__ import annotations

import argparse
import math
import re


def seed_list(text: str) -> list[int]:
    """The argparse type of the benchmarks' ``--seeds``: comma-separated, distinct, non-negative integers
    ("0,1,2"; spaces around an item allowed). Anything else is an argparse error naming the bad item."""
    seeds: list[int] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            raise argparse.ArgumentTypeError(f"empty item in {text!r}: give comma-separated seeds such as 0,1,2")
        if re.fullmatch(r"-[0-9]+", item):
            raise argparse.ArgumentTypeError(f"seeds are non-negative integers, got {item}")
        if not re.fullmatch(r"[0-9]+", item):
            raise argparse.ArgumentTypeError(f"{item!r} is not an integer seed (comma-separated seeds such as 0,1,2)")
        if int(item) in seeds:
            raise argparse.ArgumentTypeError(f"seed {int(item)} is given twice in {text!r}")
        seeds.append(int(item))
    return seeds


def seed_list_or_none(text: str) -> list[int]:
    """``seed_list``, where an empty string means no seeds (``--sweep-seeds ""``: no runs off the usual rate)."""
    return [] if not text.strip() else seed_list(text)


def same_rate(a: float, b: float) -> bool:
    """Two learning rates written differently (``1e-4``, ``0.0001``) are the same rate."""
    return math.isclose(a, b, rel_tol=1e-9)


def rate_list(text: str) -> list[float]:
    """The argparse type of a benchmark's ``--lrs``: comma-separated, distinct, positive finite learning rates
    ("5e-5,2e-4"). Anything else is an argparse error naming the bad item."""
    rates: list[float] = []
    for item in (i.strip() for i in text.split(",")):
        try:
            rate = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a learning rate (comma-separated rates such as 5e-5,2e-4)") from None
        if not (math.isfinite(rate) and rate > 0):
            raise argparse.ArgumentTypeError(f"learning rates are positive and finite, got {item}")
        if any(same_rate(rate, r) for r in rates):
            raise argparse.ArgumentTypeError(f"rate {rate:g} is given twice in {text!r}")
        rates.append(rate)
    return rates
