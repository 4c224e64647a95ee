"""Merge methods, one module each; importing this package registers them all."""

from deltawise.merge.methods import (  # noqa: F401  (imported for registration)
    breadcrumbs,
    consensus,
    continual_average,
    continual_task_arithmetic,
    dare,
    fisher,
    linear,
    model_stock,
    opcm,
    pcb,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    weight_matching,
)
