"""Merge methods, one module each; importing this package registers them all."""

from deltawise.merge.methods import (  # noqa: F401  (imported for registration)
    breadcrumbs,
    consensus,
    dare,
    fisher,
    linear,
    model_stock,
    pcb,
    regmean,
    slerp,
    task_arithmetic,
    ties,
)
