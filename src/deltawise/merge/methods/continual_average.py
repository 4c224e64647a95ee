"""Running weight average: the simplest continual-merging baseline (OPCM paper, Tang et al. 2025, arXiv 2501.09522).

Models arrive one call at a time (see ``merge/continual.py`` for the state folder):
    theta_bar_1 = theta_1;   theta_bar_t = ((t - 1) theta_bar_{t-1} + theta_t) / t
i.e. the uniform average of every model seen so far. The base model is not averaged in; it
only identifies the state (and supplies the output's config and copied tensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltawise.merge.base import register
from deltawise.merge.continual import STATE, ContinualMethod, ContinualState, StepIO, fold_elementwise


@register
class ContinualAverage(ContinualMethod):
    name = "continual_average"
    summary = "continual merging baseline: running uniform average of the arriving models"
    reference = "https://arxiv.org/abs/2501.09522"
    params = (STATE,)

    def fold(self, io: StepIO, state: ContinualState, target: Path) -> dict[str, Any]:
        n = state.count

        def update(previous, base, new):
            return new if previous is None else previous.mul_(n).add_(new).div_(n + 1)

        fold_elementwise(io, state, target, update)
        return {}
