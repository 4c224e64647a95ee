"""The JSON written by ``deltawise eval`` (schema ``deltawise.eval/1``), as pydantic models."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, Field, ValidationError

from deltawise.errors import InputError
from deltawise.io.results import SavedResult

SCHEMA = "deltawise.eval/1"
Role = Literal["source", "target"]
Task = Literal["perplexity", "classification", "multiple_choice", "lm_eval"]
Bounds = tuple[float, float]  # a confidence interval (eval/intervals.py)


class DatasetResult(BaseModel):
    name: str
    role: Role
    task: Task
    path: str
    metric: str  # "perplexity" | "accuracy" | an lm-eval metric name
    value: float
    higher_is_better: bool
    mean_nll: Optional[float] = None  # perplexity only: nats per predicted token
    n_tokens: int = 0  # predicted (scored) tokens
    n_items: int = 0  # documents or examples
    seconds: float = 0.0
    tokens_per_s: Optional[float] = None
    per_item: Optional[dict[str, float]] = None  # accuracy tasks: 1.0 correct / 0.0 wrong, by item id
    per_item_nll: Optional[dict[str, float]] = None  # perplexity: summed NLL (nats) of each item's predicted tokens
    per_item_tokens: Optional[dict[str, int]] = None  # perplexity: predicted tokens of each item


class FlipSummary(BaseModel):
    count: int
    rate: float  # count / items the base got right
    ids: list[str]
    rate_ci: Optional[Bounds] = None


class DatasetComparison(BaseModel):
    name: str
    role: Role
    metric: str
    base: float
    model: float
    ratio: float  # model relative to base, oriented so that > 1 is better
    difference: float  # model - base, oriented so that > 0 is better (ppl_base - ppl_model for perplexity)
    gain: float  # native units: accuracy points, or nats/token of NLL removed for perplexity
    ratio_ci: Optional[Bounds] = None  # paired bootstrap intervals (Forgetting.intervals says how)
    ratio_lower: Optional[float] = None  # one-sided lower bound of the ratio at the same level
    difference_ci: Optional[Bounds] = None
    gain_ci: Optional[Bounds] = None
    negative_flips: Optional[FlipSummary] = None
    positive_flips: Optional[FlipSummary] = None


class Forgetting(BaseModel):
    baseline_model: str
    baseline_fingerprint: str
    datasets: list[DatasetComparison]
    target_gain: Optional[float] = None  # mean over target datasets of (ratio - 1)
    source_retention: Optional[float] = None  # mean over source datasets of ratio
    source_retention_difference: Optional[float] = None  # mean over source datasets of difference
    forgetting_score: Optional[float] = None  # 100 * mean over source datasets of max(0, 1 - ratio)
    target_gain_ci: Optional[Bounds] = None
    source_retention_ci: Optional[Bounds] = None
    source_retention_lower: Optional[float] = None  # one-sided lower bound at the same level (budget checks)
    source_retention_difference_ci: Optional[Bounds] = None
    forgetting_score_ci: Optional[Bounds] = None
    intervals: Optional[dict[str, object]] = None  # method, level, replicates, seed


class EvalResult(SavedResult):
    schema_: str = Field(SCHEMA, alias="schema")
    kind: Literal["eval"] = "eval"
    model: str
    fingerprint: str
    created: str
    settings: dict[str, object] = {}
    datasets: list[DatasetResult]
    forgetting: Optional[Forgetting] = None

    def dataset(self, name: str) -> DatasetResult | None:
        return next((d for d in self.datasets if d.name == name), None)


def load_result(path: str | Path) -> EvalResult:
    path = Path(path)
    try:
        return EvalResult.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise InputError(f"result file {str(path)!r} not found") from None
    except ValidationError as exc:
        raise InputError(f"{path} is not a deltawise eval result ({SCHEMA}): {exc.error_count()} problem(s), "
                         f"first: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None
