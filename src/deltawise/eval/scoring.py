"""Log-likelihood of token spans under a causal LM, in padded batches.

Every task that scores text with a language model (perplexity windows, multiple-choice
continuations, interpolation curves) goes through ``score_spans`` so that batching, padding
and the shift between logits and labels are written once.

A token's negative log-likelihood is ``logsumexp(z) - z[target]`` over the logits ``z`` of the
position before it (the same number as ``-log_softmax(z)[target]``, without writing the full
log-softmax), taken over a few rows at a time (``target_nll``).
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


# logits read per logsumexp call: 2**20 float32 values (4 MiB, a few rows of a large vocabulary) stay in cache
CHUNK_VALUES = 1 << 20


def forward_parameters(model: torch.nn.Module) -> set[str]:
    """The named parameters of the model's forward (empty when its signature cannot be read)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a forward without an inspectable signature: pass nothing optional
        return set()


def keeps_last_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs): logits for the last k positions only."""
    return "logits_to_keep" in forward_parameters(model)


def target_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_values: int = CHUNK_VALUES) -> torch.Tensor:
    """Per-row ``logsumexp(logits[i]) - logits[i, targets[i]]`` in float32, ``chunk_values`` logits at a time.

    Equal to ``-log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]`` up to float rounding; the chunks bound the
    temporary of ``logsumexp`` (one chunk, not the ``[rows, vocabulary]`` log-softmax).
    """
    rows = max(1, chunk_values // max(logits.shape[-1], 1))
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], rows):
        z = logits[i : i + rows].float()  # float32 so the sum does not depend on the model dtype
        out[i : i + rows] = torch.logsumexp(z, dim=-1) - z.gather(1, targets[i : i + rows, None])[:, 0]
    return out


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

    Spans are batched longest-first (less padding) with right padding. Under causal attention, pads after
    the real tokens cannot change their logits, so batched results equal unbatched ones up to float rounding,
    and the attention mask passed masks nothing: the model runs its plain causal attention (PyTorch's SDPA
    with ``is_causal``, which skips the blocks above the diagonal) instead of building a ``[batch, 1, seq, seq]``
    mask. Where the model allows it, the vocabulary projection runs only from the batch's first scored position
    on (``logits_to_keep``: positions before it predict nothing that is scored) and no key/value cache is kept
    (``use_cache=False``).
    """
    device = next(model.parameters()).device
    order = batch_order(spans)
    accepted = forward_parameters(model)
    trim_logits = "logits_to_keep" in accepted
    fixed = {"use_cache": False} if "use_cache" in accepted else {}
    scores: list[SpanScore | None] = [None] * len(spans)
    for start in range(0, len(order), batch_size):
        batch = [spans[i] for i in order[start : start + batch_size]]
        width = max(len(s.ids) for s in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, span in enumerate(batch):
            ids[row, : len(span.ids)] = torch.tensor(span.ids)
        ids = ids.to(device)
        # logits at position p predict token p + 1, so the first one needed is at min(score_from) - 1
        first = min(s.score_from for s in batch) - 1 if trim_logits else 0
        extra = {"logits_to_keep": width - first} if first > 0 else {}
        # an all-ones mask: the pads on the right need no masking under causal attention (a mask that masks
        # nothing lets transformers use the causal kernel, and models such as GPT-2 do not warn about pads)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **fixed, **extra).logits
        for row, span in enumerate(batch):
            pred = logits[row, span.score_from - 1 - first : len(span.ids) - 1 - first]
            nll = target_nll(pred, ids[row, span.score_from : len(span.ids)]).sum().item()
            scores[order[start + row]] = SpanScore(nll, span.n_scored)
        del logits
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return scores  # type: ignore[return-value]
