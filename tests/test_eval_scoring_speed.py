"""The faster span scorer (trimmed logits, grouped windows, inference mode, an attention mask that masks nothing,
no key/value cache, log-probabilities as logsumexp minus the target logit in chunks) gives the numbers of the plain one.

``reference_scores`` restates the scorer as it was before the speed work: every logit computed, spans batched
longest-first with ties in input order. Changing which spans share a batch changes only the shapes of the padded
matrix products, so per-span NLLs may move by float32 rounding: we allow 1e-6 relative (float32's epsilon is 1.2e-7,
and a span's NLL sums up to a few hundred log-probabilities). Measured against the old scorer on the benchmark's models
(benchmarks/RESULTS.md, 2026-12-03): largest per-span difference 2.4e-4 (2.0e-7 relative) on the random Llama,
1.7e-3 (1.7e-6 relative) on SmolLM2-135M, where the old float32 log-softmax is the less exact of the two.
"""

from __future__ import annotations

import random

import pytest
import torch

from deltawise.eval.models import load_model
from deltawise.eval.perplexity import perplexity, windows
from deltawise.eval.scoring import Span, batch_order, keeps_last_logits, score_spans, target_nll
from eval_util import save_tiny_lm

REL = 1e-6


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(save_tiny_lm(tmp_path_factory.mktemp("score") / "lm", max_position_embeddings=256))


def reference_scores(model: torch.nn.Module, spans: list[Span], batch_size: int, pad_id: int) -> list[float]:
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].ids))
    out = [0.0] * len(spans)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [spans[i] for i in order[start : start + batch_size]]
            width = max(len(s.ids) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, span in enumerate(batch):
                ids[row, : len(span.ids)] = torch.tensor(span.ids)
                mask[row, : len(span.ids)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            for row, span in enumerate(batch):
                pred = logits[row, span.score_from - 1 : len(span.ids) - 1].float()
                target = ids[row, span.score_from : len(span.ids)]
                out[order[start + row]] = -torch.log_softmax(pred, -1).gather(1, target[:, None]).sum().item()
    return out


def random_documents(seed: int, n: int, longest: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, 100) for _ in range(rng.randrange(1, longest))] for _ in range(n)]


def test_the_tiny_llama_takes_logits_to_keep(lm):
    assert keeps_last_logits(lm.model)  # otherwise the tests below would not exercise the trimmed path
    assert not keeps_last_logits(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("batch_size", [1, 3, 8, 16])
@pytest.mark.parametrize("max_length,stride", [(64, 32), (48, 48), (40, 7)])
def test_sliding_window_scores_equal_the_plain_scorer(lm, batch_size, max_length, stride):
    docs = random_documents(batch_size * 7 + stride, 12, 120)
    spans = [s for d in docs for s in windows(d, max_length, stride)]
    assert any(s.score_from > 1 for s in spans) == (stride < max_length) and len({len(s.ids) for s in spans}) > 5
    got = score_spans(lm.model, spans, batch_size=batch_size, pad_id=lm.pad_id)
    want = reference_scores(lm.model, spans, batch_size, lm.pad_id)
    assert [g.n_tokens for g in got] == [s.n_scored for s in spans]
    assert [g.nll for g in got] == pytest.approx(want, rel=REL)


def test_per_document_nll_equals_the_plain_scorer(lm):
    docs = random_documents(5, 30, 200)
    got = perplexity(lm.model, docs, max_length=64, stride=32, batch_size=16, pad_id=lm.pad_id)
    spans, owner = [], []
    for d, ids in enumerate(docs):
        for span in windows(ids, 64, 32):
            spans.append(span)
            owner.append(d)
    want = [0.0] * len(docs)
    for d, nll in zip(owner, reference_scores(lm.model, spans, 16, lm.pad_id)):
        want[d] += nll
    assert got.per_document_nll == pytest.approx(want, rel=REL)
    assert got.per_document_tokens == [len(d) - 1 for d in docs]


def test_later_windows_are_grouped_apart_from_first_windows():
    spans = [Span(tuple(range(10)), 1), Span(tuple(range(10)), 5), Span(tuple(range(4)), 1), Span(tuple(range(10)), 1),
             Span(tuple(range(10)), 5)]
    assert batch_order(spans) == [1, 4, 0, 3, 2]


def test_scores_are_plain_floats_outside_inference_mode(lm):
    # the model stays usable for training after scoring (inference mode must not leak into its parameters)
    score_spans(lm.model, [Span((1, 5, 6, 7), 1)])
    loss = lm.model(input_ids=torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])).loss
    loss.backward()
    assert all(p.grad is not None for p in lm.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("chunk_values", [1, 50, 64 * 7, 1 << 20])  # one row per chunk, 2, 7 (not dividing 13), all
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_nll_equals_minus_log_softmax_at_the_target(chunk_values, dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(13, 64, generator=g) * 8).to(dtype)
    targets = torch.randint(0, 64, (13,), generator=g)
    want = -torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])[:, 0]
    got = target_nll(logits, targets, chunk_values)
    assert got.dtype == torch.float32
    assert got.double() == pytest.approx(want.tolist(), rel=1e-6, abs=1e-6)
    # property: a constant added to a row's logits changes no probability
    shifted = target_nll(logits.float() + torch.arange(13.0)[:, None] * 100, targets, chunk_values)
    assert shifted.double() == pytest.approx(want.tolist(), rel=1e-4, abs=1e-4)
    assert (got >= 0).all()


class Bigram(torch.nn.Module):
    """A causal "LM" whose logits at a position are a table row of the token there: NLLs computable by hand.

    Its forward takes neither ``logits_to_keep`` nor ``use_cache`` (the scorer must not pass them)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask):
        assert bool(attention_mask.all())  # right pads need no masking under causal attention
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_span_nll_of_a_bigram_model_equals_the_hand_computed_sum():
    table = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    spans = [Span((0, 1, 2, 2), 1), Span((2, 0), 1), Span((1, 0, 1), 2)]

    def nll(prev: int, nxt: int) -> float:
        return float(torch.logsumexp(table[prev].double(), 0) - table[prev, nxt])

    want = [nll(0, 1) + nll(1, 2) + nll(2, 2), nll(2, 0), nll(0, 1)]
    for batch_size in (1, 2, 3):
        got = score_spans(Bigram(table), spans, batch_size=batch_size, pad_id=2)
        assert [g.nll for g in got] == pytest.approx(want, rel=1e-6)
        assert [g.n_tokens for g in got] == [3, 1, 1]
