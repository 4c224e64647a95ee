"""Tiny classifiers and LMs (character tokenizer, hidden 32) with small datasets, for the data-driven methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TEXTS = ["good day", "bad day", "fine food", "awful food", "nice play", "poor play", "great song", "sad song", "warm sun"]


@pytest.fixture(scope="session")
def dd(tmp_path_factory) -> dict[str, Path]:
    """Read-only: ``cls`` (classifier, 3 labels) and ``cls1``/``cls2`` (it + noise), ``lm``/``lm1``/``lm2``
    likewise, ``labelled`` (JSONL text+label), ``text`` (plain text)."""
    from conftest import perturb
    from eval_util import save_tiny_classifier, save_tiny_lm

    root = tmp_path_factory.mktemp("datadriven")
    cls = save_tiny_classifier(root / "cls", num_labels=3)
    lm = save_tiny_lm(root / "lm")
    labelled = root / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(TEXTS)))
    text = root / "text.txt"
    text.write_text("\n\n".join(TEXTS) + "\n")
    return {
        "root": root, "cls": cls, "cls1": perturb(cls, root / "cls1", 1, 0.05), "cls2": perturb(cls, root / "cls2", 2, 0.05),
        "lm": lm, "lm1": perturb(lm, root / "lm1", 1, 0.05), "lm2": perturb(lm, root / "lm2", 2, 0.05),
        "labelled": labelled, "text": text,
    }
