"""Model merging: recipes, per-tensor methods registered by name, and the streaming engine."""

import os
from typing import TYPE_CHECKING

from deltawise.merge.api import merge_state_dicts
from deltawise.merge.base import REGISTRY, MergeMethod, TensorJob, register
from deltawise.merge.engine import MergeOptions, MergeResult, run_merge
from deltawise.merge.plan import MergePlan, build_plan
from deltawise.merge.recipe import Recipe, load_recipe, parse_recipe

if TYPE_CHECKING:
    from deltawise.merge.adapter_out import AdapterMergeResult

__all__ = [
    "REGISTRY", "MergeMethod", "TensorJob", "register", "MergeOptions", "MergeResult", "run_merge",
    "MergePlan", "build_plan", "Recipe", "load_recipe", "parse_recipe", "merge",
    "merge_state_dicts",
]


def merge(recipe: "Recipe | dict | str | os.PathLike", out: "str | os.PathLike",
          **options) -> "MergeResult | AdapterMergeResult":
    """Merge from a Recipe, a dict in recipe form, or a recipe YAML path; write the model to ``out``
    (a PEFT LoRA adapter when the recipe has an ``adapter:`` key: ``adapter_out.run_adapter_merge``)."""
    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    allow_pickle = options.pop("allow_pickle", False)
    plan = build_plan(recipe, allow_pickle=allow_pickle, strict=options.pop("strict", False))
    if recipe.adapter is not None:
        from deltawise.merge.adapter_out import adapter_settings, run_adapter_merge

        settings = adapter_settings(recipe)
        assert settings is not None
        return run_adapter_merge(plan, out, settings, overwrite=options.pop("overwrite", False),
                                 progress=options.pop("progress", None))
    return run_merge(plan, out, MergeOptions(**options))
