"""Seed statistics shared by the benchmarks: the mean over seeds with a Student-t interval.

A benchmark row of several seeds (experts retrained, splits redrawn or data order reshuffled) is summarised by
its mean, its sample standard deviation and the t-interval of the mean with n − 1 degrees of freedom: with 3
seeds the 95% interval is ±4.30 sd/√3, wide on purpose (three draws say little about the spread).
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, Optional[float], Optional[float], Optional[float]]:
    """(mean, sd, low, high) of ``values``; sd and the bounds are None for fewer than two values."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None, None, None
    sd = statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return m, sd, m - half, m + half
