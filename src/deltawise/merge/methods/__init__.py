"""Merge methods, one module each; importing this package registers them all."""

from deltawise.merge.methods import (  # noqa: F401  (imported for registration)
    arcee_fusion,
    breadcrumbs,
    consensus,
    continual_average,
    continual_task_arithmetic,
    dare,
    della,
    fisher,
    linear,
    model_stock,
    nearswap,
    opcm,
    pcb,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    weight_matching,
)
