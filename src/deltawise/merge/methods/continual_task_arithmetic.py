"""Continual task arithmetic: the sequential baseline of OPCM (Tang et al. 2025, arXiv 2501.09522).

Models arrive one call at a time (see ``merge/continual.py`` for the state folder):
    theta_bar_t = theta_bar_{t-1} + lambda * (theta_t - theta_0),   theta_bar_0 = theta_0
so after T models theta_bar = theta_0 + lambda * sum_t tau_t, exactly task arithmetic over all
models seen so far. The OPCM paper's baseline uses lambda = 0.3 (the default here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltawise.merge.base import register
from deltawise.merge.continual import STATE, ContinualMethod, ContinualState, StepIO, fold_elementwise
from deltawise.merge.params import Param


@register
class ContinualTaskArithmetic(ContinualMethod):
    name = "continual_task_arithmetic"
    summary = "continual merging baseline: add lambda * tau of each arriving model to a running state"
    reference = "https://arxiv.org/abs/2501.09522"
    params = (STATE, Param("lambda", float, 0.3, help="scale of each task vector (OPCM paper's baseline: 0.3)"))

    def fold(self, io: StepIO, state: ContinualState, target: Path) -> dict[str, Any]:
        lam = state.params["lambda"]

        def update(previous, base, new):
            return new.sub_(base).mul_(lam).add_(base if previous is None else previous)

        fold_elementwise(io, state, target, update)
        return {}
