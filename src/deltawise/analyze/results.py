"""JSON written by ``deltawise analyze`` (schemas ``deltawise.analyze.weights/1`` and
``deltawise.analyze.interpolation/1``), as pydantic models."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from deltawise.io.results import SavedResult

WEIGHTS_SCHEMA = "deltawise.analyze.weights/1"
INTERPOLATION_SCHEMA = "deltawise.analyze.interpolation/1"


class ModelRef(BaseModel):
    name: str
    path: str
    fingerprint: str


class DeltaNorm(BaseModel):
    model: str
    norm: float  # ||W_ft - W0||_F
    relative: Optional[float]  # norm / ||W0||_F (None when W0 is all zeros)


class IntruderStats(BaseModel):
    model: str
    count: int
    similarities: list[float]
    singular_values: list[float]
    base_singular_values: list[float]


class SignStats(BaseModel):
    entries: int
    conflicts: int
    overlapping: int
    rate: float
    rate_among_overlap: float


class MaskStats(BaseModel):
    entries: int
    selfish: int
    catastrophic: int
    selfish_rate: float
    catastrophic_rate: float
    selected: list[int]
    jaccard: list[list[float]]


class TensorAnalysis(BaseModel):
    name: str
    shape: list[int]
    base_norm: float
    deltas: list[DeltaNorm]
    intruders: Optional[list[IntruderStats]] = None
    sign_conflict: Optional[SignStats] = None
    masks: Optional[MaskStats] = None


class ModelSummary(BaseModel):
    model: str
    delta_norm: float  # over all analysed tensors: sqrt(sum of squared per-tensor norms)
    relative: Optional[float]
    intruders: int  # summed over matrices
    matrices: int  # matrices searched for intruders


class WeightsSummary(BaseModel):
    models: list[ModelSummary]
    sign_conflict_rate: Optional[float] = None  # conflicts / entries over all tensors
    selfish_rate: Optional[float] = None
    catastrophic_rate: Optional[float] = None


class WeightsAnalysis(SavedResult):
    schema_: str = Field(WEIGHTS_SCHEMA, alias="schema")
    kind: Literal["weights"] = "weights"
    base: ModelRef
    models: list[ModelRef]
    settings: dict[str, object]
    tensors: list[TensorAnalysis]
    summary: WeightsSummary


class Interpolation(SavedResult):
    schema_: str = Field(INTERPOLATION_SCHEMA, alias="schema")
    kind: Literal["interpolation"] = "interpolation"
    model_a: ModelRef
    model_b: ModelRef
    data: str
    n_tokens: int
    lambdas: list[float]
    loss: list[float]  # mean NLL per predicted token at each lambda
    perplexity: list[float]
    barrier: float  # max_lambda [L(lambda) - ((1 - lambda) L(0) + lambda L(1))]
    barrier_lambda: float
