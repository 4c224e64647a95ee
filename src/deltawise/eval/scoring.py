"""Log-likelihood of token spans under a causal LM, in padded batches.

Every task that scores text with a language model (perplexity windows, multiple-choice
continuations, interpolation curves) goes through ``score_spans`` so that batching, padding
and the shift between logits and labels are written once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Span:
    """Token ids fed to the model, of which positions ``score_from..len(ids)-1`` are scored.

    Position ``p`` is predicted from the logits at ``p - 1``, so ``score_from >= 1``.
    """

    ids: tuple[int, ...]
    score_from: int

    def __post_init__(self) -> None:
        if not 1 <= self.score_from <= len(self.ids):
            raise ValueError(f"score_from={self.score_from} outside 1..{len(self.ids)}")

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.score_from


@dataclass(frozen=True)
class SpanScore:
    nll: float  # total negative log-likelihood (nats) of the scored tokens
    n_tokens: int


def keeps_last_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs): logits for the last k positions only."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without an inspectable signature: compute every logit
        return False


def batch_order(spans: Sequence[Span]) -> list[int]:
    """Span indices longest first (least padding); among equal lengths, latest ``score_from`` first.

    The second key groups a document's later sliding windows (which score only their tail) apart from first windows
    (which score almost every position), so that most batches need logits for their tail only.
    """
    return sorted(range(len(spans)), key=lambda i: (-len(spans[i].ids), -spans[i].score_from))


@torch.inference_mode()
def score_spans(
    model: torch.nn.Module,
    spans: Sequence[Span],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Progress | None = None,
) -> list[SpanScore]:
    """Total NLL of each span's scored tokens, in the order given.

    Spans are batched longest-first (less padding) with right padding and an attention mask:
    under causal attention, pads after the real tokens cannot change their logits, so batched
    results equal unbatched ones up to float rounding. Where the model allows it (``logits_to_keep``),
    the vocabulary projection runs only from the batch's first scored position on: positions before
    it predict nothing that is scored.
    """
    device = next(model.parameters()).device
    order = batch_order(spans)
    trim_logits = keeps_last_logits(model)
    scores: list[SpanScore | None] = [None] * len(spans)
    for start in range(0, len(order), batch_size):
        batch = [spans[i] for i in order[start : start + batch_size]]
        width = max(len(s.ids) for s in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, span in enumerate(batch):
            ids[row, : len(span.ids)] = torch.tensor(span.ids)
            mask[row, : len(span.ids)] = 1
        # logits at position p predict token p + 1, so the first one needed is at min(score_from) - 1
        first = min(s.score_from for s in batch) - 1 if trim_logits else 0
        extra = {"logits_to_keep": width - first} if first > 0 else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits
        for row, span in enumerate(batch):
            # float32 so the sum does not depend on the model dtype
            pred = logits[row, span.score_from - 1 - first : len(span.ids) - 1 - first].float()
            target = ids[row, span.score_from : len(span.ids)].to(device)
            nll = -torch.log_softmax(pred, dim=-1).gather(1, target[:, None]).sum().item()
            scores[order[start + row]] = SpanScore(nll, span.n_scored)
        del logits
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return scores  # type: ignore[return-value]
