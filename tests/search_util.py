"""Helpers of the search tests (budget, lr-sweep, repair): a constructed source/target trade-off on the tiny LM, the
selection/held-out files a search cuts, and a hand evaluation against the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapt_util import DOCS, base_model, batch_of

from deltawise.data.read import load_items
from deltawise.eval.forgetting import forgetting
from deltawise.eval.runner import EvalOptions, evaluate
from deltawise.search.splits import split_items, write_items


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """32-wide models: more torch threads only contend for the shared cores (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit(model, batch, steps: int, lr: float) -> None:
    """``steps`` AdamW steps on one batch; the model is left in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def write_texts(root: Path) -> dict[str, Path]:
    """The source docs (adapt_util.DOCS) and the target docs (the same words in reverse order), each as JSONL
    items (``src``, ``tgt``) and as '%'-separated training text (``src_txt``, ``tgt_txt``)."""
    target_docs = [" ".join(reversed(d.split())) for d in DOCS]
    files = {"src": root / "src.jsonl", "tgt": root / "tgt.jsonl", "src_txt": root / "src.txt", "tgt_txt": root / "tgt.txt"}
    files["src"].write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    files["tgt"].write_text("".join(json.dumps({"text": d}) + "\n" for d in target_docs))
    files["src_txt"].write_text("\n%\n".join(DOCS) + "\n")
    files["tgt_txt"].write_text("\n%\n".join(target_docs) + "\n")
    return files


def save(model, tok, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def source_base(tiny_lm, files: dict[str, Path], folder: Path):
    """A base that knows the source text: the tiny LM after 15 steps (lr 1e-2, seed 0) on ``src_txt``, saved to
    ``folder``; returns (model, tokenizer) for further training."""
    from deltawise.adapt.train import load_tokenizer

    torch.manual_seed(0)
    model, tok = base_model(tiny_lm["model"]), load_tokenizer(tiny_lm["model"])
    fit(model, batch_of(tiny_lm, data=files["src_txt"]), 15, 1e-2)
    save(model, tok, folder)
    return model, tok


def hand_splits(files: dict[str, Path], folder: Path, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """The (selection, held-out) files a search cuts from src and tgt: the same seeded rule, applied by hand."""
    splits = {}
    for position, name in enumerate(("src", "tgt")):
        selection, heldout = split_items(load_items(files[name]), 0.5, seed, position)
        splits[name] = (write_items(folder / "selection" / f"{name}.jsonl", selection),
                        write_items(folder / "heldout" / f"{name}.jsonl", heldout))
    return splits


def versus_base(base: Path, model: Path, splits: dict[str, tuple[Path, Path]], which: int,
                options: EvalOptions | None = None):
    """The model against the base on the selection (0) or held-out (1) files, with the default intervals
    (``options``: the model's evaluation options): {dataset name: comparison}."""
    src, tgt = splits["src"][which], splits["tgt"][which]
    ref = evaluate(str(base), [src], [tgt], EvalOptions())
    return {c.name: c for c in forgetting(evaluate(str(model), [src], [tgt], options or EvalOptions()), ref).datasets}
