"""Token-weighted perplexity with a sliding window for documents longer than the context."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from deltawise.eval.scoring import Progress, Span, score_spans


def windows(ids: Sequence[int], max_length: int, stride: int) -> list[Span]:
    """Strided windows over one document (the Hugging Face "perplexity of fixed-length models" scheme).

    Windows start every ``stride`` tokens and hold up to ``max_length`` tokens; each window scores
    only the tokens no earlier window scored, so every token after the first is predicted exactly
    once, with at least ``max_length - stride`` tokens of context once the first window is full.
    With ``stride == max_length`` the first token of each window has no context and is skipped.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    spans: list[Span] = []
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        score_from = max(prev_end - begin, 1)
        if end - begin >= 2 and score_from < end - begin:
            spans.append(Span(tuple(ids[begin:end]), score_from))
        prev_end = end
        if end == len(ids):
            break
    return spans


@dataclass(frozen=True)
class Perplexity:
    nll: float  # total NLL over all predicted tokens (nats)
    n_tokens: int  # predicted tokens
    n_documents: int
    per_document_nll: list[float]
    per_document_tokens: list[int]

    @property
    def mean_nll(self) -> float:
        return self.nll / self.n_tokens if self.n_tokens else float("nan")

    @property
    def value(self) -> float:
        return math.exp(self.mean_nll)


def perplexity(
    model: torch.nn.Module,
    documents: Sequence[Sequence[int]],
    *,
    max_length: int,
    stride: int,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Progress | None = None,
) -> Perplexity:
    """exp(total NLL / total predicted tokens) over tokenized documents (token-weighted, not a mean of
    per-document perplexities)."""
    spans, owner = [], []
    for d, ids in enumerate(documents):
        for span in windows(ids, max_length, stride):
            spans.append(span)
            owner.append(d)
    scores = score_spans(model, spans, batch_size=batch_size, pad_id=pad_id, progress=progress)
    nll = [0.0] * len(documents)
    tokens = [0] * len(documents)
    for d, s in zip(owner, scores):
        nll[d] += s.nll
        tokens[d] += s.n_tokens
    return Perplexity(sum(nll), sum(tokens), len(documents), nll, tokens)
