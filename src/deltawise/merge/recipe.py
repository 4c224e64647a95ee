"""Merge recipes: YAML validated with pydantic; a superset of mergekit's ``models`` format.

A mergekit recipe using ``merge_method``, ``models``, ``base_model``, ``parameters`` (scalars,
depth gradients, ``filter`` lists), ``dtype``/``out_dtype``, ``tokenizer_source``, ``tokenizer`` and
``chat_template`` runs unchanged, as does one with ``slices`` or ``modules`` instead of ``models`` (layer stacks:
``deltawise.merge.slices``). deltawise adds ``exclude`` (tensor-name regexes copied unmerged from the base) and
``seed`` (reproducible random methods) and ``adapter`` (write a PEFT LoRA adapter: ``adapter: {rank: 16}``,
``adapter: {energy: 0.99}`` or ``adapter: {}``). Unknown keys are errors, so a typo cannot be ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from deltawise.errors import RecipeError, bullet_list
from deltawise.options import EmbeddingFormat

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


class SliceSource(BaseModel):
    """One source of an output slice: layers ``layer_range`` = [start, end) of ``model`` (mergekit's InputSliceDefinition)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = Field(default_factory=dict)


class OutputSlice(BaseModel):
    """A run of output layers, each merged from the same-offset layer of every source (mergekit's OutputSliceDefinition)."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None  # accepted as mergekit 0.1.5 accepts it; neither tool uses it
    parameters: dict[str, Setting] = Field(default_factory=dict)


class OutputModule(BaseModel):
    """mergekit's ``modules:`` entry: whole models or slices, with the module's own parameters."""

    model_config = ConfigDict(extra="forbid")
    slices: Optional[list[OutputSlice]] = None
    models: Optional[list[ModelEntry]] = None
    parameters: dict[str, Setting] = Field(default_factory=dict)


class AdapterSpec(BaseModel):
    """``adapter:`` -- write the merge as a PEFT LoRA adapter of base_model (``deltawise.merge.adapter_out``);
    ``rank``/``energy`` truncate the matrices whose merge is not an exact sum of LoRA factors; ``embeddings: lora``
    writes changed embedding tables as LoRA-embedding factors too (default ``whole``: saved whole, exact)."""

    model_config = ConfigDict(extra="forbid")
    rank: Optional[int] = Field(None, ge=1)
    energy: Optional[float] = Field(None, gt=0, le=1)
    embeddings: Optional[EmbeddingFormat] = None  # changed embedding tables: saved whole, or LoRA factors


class ModelTokenSource(BaseModel):
    """``{kind: model_token, model: M, token: T}`` (or ``token_id``): the row of token T in model M."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = None
    token: Optional[str] = None

    @model_validator(mode="after")
    def _one_token(self) -> "ModelTokenSource":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """Where one output token's embedding row comes from (mergekit's TokenEmbeddingConfig): a model
    (its row for this token), a token of a model, or zeros; ``force`` applies it to every model,
    even one that has the token."""

    model_config = ConfigDict(extra="forbid")
    source: Union[ModelTokenSource, ZeroSource, str, None] = None
    force: bool = False


class TokenizerSection(BaseModel):
    """mergekit's ``tokenizer:`` section; ``new_rows`` is a deltawise extension (docs/merging.md)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # "union", "base" or a model
    tokens: dict[str, TokenEmbedding] = Field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = Field(None, ge=1)
    new_rows: Literal["mergekit", "mean"] = "mergekit"


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
    adapter: Optional[AdapterSpec] = Field(None, description="write a PEFT LoRA adapter instead of a model")
    # layer stacks (frankenmerges, per-range parameters): deltawise.merge.slices
    slices: Optional[list[OutputSlice]] = None
    modules: Optional[dict[str, OutputModule]] = None
    # vocabularies matched by token string (deltawise.merge.vocabulary)
    tokenizer: Optional[TokenizerSection] = None
    chat_template: Optional[str] = None
    # the file the recipe was read from (load_recipe), for messages about relative paths
    _path: Optional[Path] = PrivateAttr(default=None)

    @property
    def path(self) -> Optional[Path]:
        return self._path

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter_flag(cls, value: Any) -> Any:
        # `adapter: true` or a bare `adapter:` (called only for a key that is present) asks for an adapter
        # without a rank or energy; `false` for none
        if value is True or value is None:
            return {}
        return None if value is False else value

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_entries(cls, value: Any) -> Any:
        # mergekit allows bare strings in some examples; normalise them to entries
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @property
    def sliced(self) -> bool:
        """A ``slices:`` or ``modules:`` recipe: the output layers are listed per source range."""
        return bool(self.slices or self.modules)

    def unsupported(self) -> list[str]:
        problems = []
        given = [key for key in ("models", "slices", "modules") if getattr(self, key)]
        if len(given) > 1:
            problems.append(f"give exactly one of 'models', 'slices' or 'modules', not {' and '.join(given)}")
        for name, module in (self.modules or {}).items():
            if bool(module.slices) == bool(module.models):
                problems.append(f"modules.{name}: give either 'slices' or 'models'")
        if not given:
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
        raise RecipeError(f"{source} is invalid:\n{bullet_list(validation_problems(exc))}") from None
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
    recipe = parse_recipe(data, str(path))
    recipe._path = path
    return recipe


# pydantic names each branch of a union in the error's location: a type (bool, list[...]) or a class
_UNION_BRANCH = re.compile(r"^(bool|int|float|str|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")
SETTING_SHAPES = ("a number, string or true/false; a list of those (a gradient over the layers); "
                  "{value: ..., filter: ...}; or a list of such mappings")


def validation_problems(exc: ValidationError) -> list[str]:
    """One line per wrong value of the recipe, every one of them.

    pydantic reports a value that fits no branch of a union once per branch (eight lines for one
    parameter); those are folded into one line saying what the value may be, keeping a branch's
    specific complaint (an unknown key of a ``{value, filter}`` mapping) when the value had that shape."""
    groups: dict[str, list[dict]] = {}
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        cut = next((i for i, part in enumerate(loc) if _UNION_BRANCH.match(part)), len(loc))
        place = ".".join(loc[:cut]) or "(top level)"
        groups.setdefault(place, []).append({**error, "branch": loc[cut:]})
    problems = []
    for place, errors in groups.items():
        if len(errors) == 1 or not any(e["branch"] for e in errors):
            problems.extend(f"{place}: {e['msg']}" for e in errors)
            continue
        value = errors[0]["input"]
        # a mapping was meant as {value, filter}: its own complaints say what is wrong with it
        specific = [f"{'.'.join(e['branch'][1:])}: {e['msg']}" for e in errors
                    if isinstance(value, dict) and e["branch"][:1] == ["ConditionalValue"] and len(e["branch"]) > 1]
        detail = f" ({'; '.join(specific)})" if specific else ""
        problems.append(f"{place}: {value!r} is not a valid setting{detail}; expected {SETTING_SHAPES}")
    return problems
