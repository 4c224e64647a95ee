"""Multiple-choice accuracy: pick the choice the LM finds most likely after the context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from deltawise.data.read import Item
from deltawise.errors import InputError
from deltawise.eval.models import LoadedModel
from deltawise.eval.scoring import Progress, Span, score_spans

Norm = Literal["total", "token", "byte"]


@dataclass(frozen=True)
class ChoiceOutcome:
    id: str
    scores: list[float]  # log-likelihood of each choice, normalised as asked (higher = preferred)
    predicted: int
    answer: int

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer


def context_of(item: Item) -> str:
    f = item.fields
    parts = [str(f[k]) for k in ("context", "question") if f.get(k)]
    if not parts:
        raise InputError(f"{item.where}: a multiple-choice item has neither 'question' nor 'context'")
    return "\n".join(parts)


def continuation(context: str, choice: str) -> str:
    """The choice as it follows the context: one space between them unless either side has whitespace."""
    if not context or context[-1].isspace() or choice[:1].isspace():
        return choice
    return " " + choice


def choice_spans(lm: LoadedModel, context: str, choices: Sequence[str], max_length: int) -> list[Span]:
    ctx = lm.tokenizer(context)["input_ids"]
    spans = []
    for choice in choices:
        cont = lm.tokenizer(continuation(context, choice), add_special_tokens=False)["input_ids"]
        if not cont:
            raise InputError(f"choice {choice!r} tokenizes to nothing")
        ids = (ctx + cont)[-max_length:]  # keep the choice whole; drop context from the left if too long
        spans.append(Span(tuple(ids), max(len(ids) - len(cont), 1)))
    return spans


def multiple_choice(
    lm: LoadedModel, items: Sequence[Item], *, norm: Norm = "total", max_length: int, batch_size: int = 8,
    progress: Progress | None = None,
) -> list[ChoiceOutcome]:
    spans, owners = [], []
    for item in items:
        choices = [str(c) for c in item.fields["choices"]]
        answer = item.fields["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise InputError(f"{item.where}: 'answer' must be an index into 'choices' (0..{len(choices) - 1}), got {answer!r}")
        context = context_of(item)
        for c, span in enumerate(choice_spans(lm, context, choices, max_length)):
            spans.append(span)
            owners.append((item, c, len(continuation(context, choices[c]).encode())))
    scores = score_spans(lm.model, spans, batch_size=batch_size, pad_id=lm.pad_id, progress=progress)
    by_item: dict[str, list[float]] = {}
    for (item, _, nbytes), s in zip(owners, scores):
        denom = {"total": 1, "token": s.n_tokens, "byte": nbytes}[norm]
        by_item.setdefault(item.id, []).append(-s.nll / denom)
    outcomes = []
    for item in items:
        sc = by_item[item.id]
        outcomes.append(ChoiceOutcome(item.id, sc, max(range(len(sc)), key=sc.__getitem__), item.fields["answer"]))
    return outcomes
