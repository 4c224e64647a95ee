"""Merge recipes: YAML validated with pydantic; a superset of mergekit's ``models`` format.

A mergekit recipe using ``merge_method``, ``models``, ``base_model``, ``parameters`` (scalars,
depth gradients, ``filter`` lists), ``dtype``/``out_dtype`` and ``tokenizer_source`` runs
unchanged. deltawise adds ``exclude`` (tensor-name regexes copied unmerged from the base) and
``seed`` (reproducible random methods). Unknown keys are errors, so a typo cannot be ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deltawise.errors import RecipeError, bullet_list

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class ConditionalValue(BaseModel):
    """``{filter: self_attn, value: 0.3}``: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: Optional[str] = None


Setting = Union[ScalarOrGradient, ConditionalValue, list[ConditionalValue]]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] = Field(default_factory=dict)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[ModelEntry] = Field(default_factory=list)
    base_model: Optional[str] = None
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    # deltawise extensions
    exclude: list[str] = Field(default_factory=list, description="regexes of tensor names copied from the base unmerged")
    seed: int = Field(0, description="seed for random methods (DARE); the same seed gives the same output")
    # mergekit features not supported yet: accepted by the parser so the error can say so clearly
    slices: Optional[Any] = None
    modules: Optional[Any] = None
    tokenizer: Optional[Any] = None
    chat_template: Optional[str] = None

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_entries(cls, value: Any) -> Any:
        # mergekit allows bare strings in some examples; normalise them to entries
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    def unsupported(self) -> list[str]:
        problems = []
        if self.slices is not None or self.modules is not None:
            problems.append("mergekit 'slices'/'modules' recipes are not supported yet; list whole models under 'models'")
        if self.tokenizer is not None:
            problems.append("the mergekit 'tokenizer' section (vocabulary union) is not supported; use tokenizer_source: base")
        if self.tokenizer_source == "union":
            problems.append("tokenizer_source: union is not supported; use 'base' or a model path")
        if not self.models:
            problems.append("'models' is empty: list at least one model to merge")
        return problems

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        data["merge_method"] = self.merge_method
        return yaml.safe_dump(data, sort_keys=False)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with at least merge_method and models")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise RecipeError(f"{source} is invalid:\n{bullet_list(_dedupe(problems))}") from None
    problems = recipe.unsupported()
    if problems:
        raise RecipeError(f"{source}:\n{bullet_list(problems)}")
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None
    return parse_recipe(data, str(path))


def _dedupe(items: list[str]) -> list[str]:
    # pydantic reports one error per union branch; keep the first of each location
    seen, out = set(), []
    for item in items:
        key = item.split(":", 1)[0]
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
