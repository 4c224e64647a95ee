"""Perplexity equals hand computations: single text, batched vs unbatched, sliding window."""

from __future__ import annotations

import math

import pytest
import torch

from deltawise.eval.models import load_model
from deltawise.eval.perplexity import perplexity, windows
from eval_util import save_tiny_lm

TEXTS = [
    "The cat sat on the mat.",
    "A much longer sentence, with commas; and more words than the first one has.",
    "Hi",
    "Weights remember what data forgot.",
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(save_tiny_lm(tmp_path_factory.mktemp("ppl") / "lm"))


def ids_of(lm, text):
    return lm.tokenizer(text)["input_ids"]


def test_perplexity_equals_hand_computation(lm):
    ids = torch.tensor([ids_of(lm, TEXTS[0])])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0]
    nll = -torch.log_softmax(logits[:-1].double(), -1).gather(1, ids[0, 1:, None]).sum().item()
    n = ids.shape[1] - 1
    got = perplexity(lm.model, [ids[0].tolist()], max_length=64, stride=32)
    assert got.n_tokens == n
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.value == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_token_weighted_not_mean_of_documents(lm):
    docs = [ids_of(lm, t) for t in TEXTS]
    got = perplexity(lm.model, docs, max_length=64, stride=32)
    singles = [perplexity(lm.model, [d], max_length=64, stride=32) for d in docs]
    assert got.value == pytest.approx(math.exp(sum(s.nll for s in singles) / sum(s.n_tokens for s in singles)), rel=1e-5)
    assert got.value != pytest.approx(sum(s.value for s in singles) / len(singles), rel=1e-3)


def test_batched_equals_unbatched(lm):
    docs = [ids_of(lm, t) for t in TEXTS]
    one = perplexity(lm.model, docs, max_length=64, stride=32, batch_size=1, pad_id=lm.pad_id)
    four = perplexity(lm.model, docs, max_length=64, stride=32, batch_size=4, pad_id=lm.pad_id)
    assert four.n_tokens == one.n_tokens
    assert four.per_document_nll == pytest.approx(one.per_document_nll, rel=1e-5)


def test_sliding_window_equals_manual_strided_computation(lm):
    ids = torch.tensor(ids_of(lm, " ".join(TEXTS)))[:60]
    max_len, stride = 16, 6
    nll, n, prev_end = 0.0, 0, 0
    with torch.no_grad():  # the Hugging Face "perplexity of fixed-length models" loop, written out
        for begin in range(0, len(ids), stride):
            end = min(begin + max_len, len(ids))
            inp = ids[begin:end]
            labels = inp.clone()
            labels[: -(end - prev_end)] = -100
            logits = lm.model(input_ids=inp[None]).logits[0, :-1]
            tgt = labels[1:]
            keep = tgt != -100
            nll -= torch.log_softmax(logits[keep].double(), -1).gather(1, tgt[keep][:, None]).sum().item()
            n += int(keep.sum())
            prev_end = end
            if end == len(ids):
                break
    got = perplexity(lm.model, [ids.tolist()], max_length=max_len, stride=stride, batch_size=3)
    assert n == len(ids) - 1 == got.n_tokens
    assert got.nll == pytest.approx(nll, rel=1e-5)
    # a window as long as the document would see more context: the strided value must differ
    full = perplexity(lm.model, [ids.tolist()], max_length=64, stride=64)
    assert full.nll != pytest.approx(nll, rel=1e-4)


def test_windows_cover_every_token_once():
    spans = windows(list(range(50)), max_length=10, stride=4)
    scored = [s.ids[i] for s in spans for i in range(s.score_from, len(s.ids))]
    assert scored == list(range(1, 50))
    with pytest.raises(ValueError):
        windows([1, 2, 3], max_length=4, stride=5)
