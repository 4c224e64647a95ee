"""Score an in-memory model on held-out data, higher is better: accuracy, or negative loss/perplexity.

Accuracy and perplexity come from ``eval.runner.score_dataset``, the function ``deltawise eval`` and the
retention-budget search score with, so a soup's or aTLAS's scores equal what ``deltawise eval`` reports for the
same data and settings. Only the cross-entropy of a classifier (``loss``), which ``eval`` does not report, is
computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltawise.data.tasks import TaskData
from deltawise.errors import InputError
from deltawise.eval.classify import class_logits, label_index
from deltawise.eval.models import LoadedModel
from deltawise.eval.results import DatasetResult, EvalResult
from deltawise.eval.runner import score_dataset

METRICS = ("auto", "accuracy", "loss", "perplexity")


@dataclass(frozen=True)
class Score:
    metric: str
    value: float  # as reported: accuracy, mean loss (nats) or perplexity

    @property
    def score(self) -> float:
        """Higher is better."""
        return self.value if self.metric == "accuracy" else -self.value


def resolve_metric(task: str, metric: str) -> str:
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "auto":
        return "accuracy" if task == "classification" else "loss"
    if metric == "accuracy" and task != "classification":
        raise InputError("--metric accuracy needs labelled classification data ('text' and 'label')")
    if metric == "perplexity" and task != "causal_lm":
        raise InputError("--metric perplexity applies to text data (causal LM); use accuracy or loss for classification")
    return metric


@torch.no_grad()
def score_model(lm: LoadedModel, data: TaskData, metric: str, *, max_length: int, batch_size: int = 8) -> Score:
    lm.model.eval()
    if data.task == "classification":
        if not data.labelled:
            raise InputError(f"{data.path}: scoring a classifier needs a 'label' on every item")
        if metric == "accuracy":
            result = score_dataset(lm, data.items, "classification", name=data.path.name, role="target", path=str(data.path),
                                   max_length=max_length, stride=max_length, batch_size=batch_size)
            return Score(metric, result.value)
        labels = torch.tensor([label_index(lm, i) for i in data.items])
        logits = torch.cat([x.float().cpu() for x in class_logits(lm, data.items, max_length=max_length, batch_size=batch_size)])
        return Score(metric, float(torch.nn.functional.cross_entropy(logits, labels)))
    result = score_data(lm, data, name=data.path.name, max_length=max_length, batch_size=batch_size)
    return Score(metric, result.value if metric == "perplexity" else result.mean_nll)


@torch.no_grad()
def score_data(lm: LoadedModel, data: TaskData, *, name: str, max_length: int, batch_size: int) -> DatasetResult:
    """``deltawise eval``'s scores of the loaded model on ``data`` (accuracy for classification, else perplexity),
    per-item results kept, in windows of at most the model's context."""
    window = min(max_length, lm.context_length)
    task = "classification" if data.task == "classification" else "perplexity"
    return score_dataset(lm, data.items, task, name=name, role="target", path=str(data.path), max_length=window,
                         stride=max(window // 2, 1), batch_size=batch_size)


def as_result(label: str, datasets: list[DatasetResult]) -> EvalResult:
    """Scores of an in-memory model wrapped as an ``EvalResult``, so that ``eval.forgetting`` can compare two."""
    return EvalResult(model=label, fingerprint=label, created="", datasets=datasets)
