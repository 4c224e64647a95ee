"""A tiny stand-in for the long language-transfer benchmark (benchmarks/language_transfer_long.py): a random Llama and
a work folder's data laid out as prepare_data writes it (its sizes.json makes the script reuse the sets instead of
drawing SmolLM2's)."""

from __future__ import annotations

import json
import random
from pathlib import Path

EN = "the cat sat on a mat and the dog ran to the park while birds sang in green trees".split()
DE = "der hund lief schnell zum grossen park und die katze schlief auf einer warmen decke".split()
ITEMS = 12  # per evaluation and selection set
MC = 12  # multiple-choice items: enough that the random base gets some right (its accuracy is the ratio's denominator)
SETS = ["--eval-items", str(ITEMS), "--select-items", str(ITEMS), "--mc-items", str(MC)]  # the sizes write_data writes


def texts(words: list[str], n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(10)) for _ in range(n)]


def corpus(seed: int = 0) -> tuple[list[str], list[str]]:
    """English and German texts: the evaluation and selection sets, then the training text."""
    rng = random.Random(seed)
    return texts(EN, 3 * ITEMS + 20, rng), texts(DE, 2 * ITEMS + 40, rng)


def tiny_base(folder: Path, en: list[str], de: list[str]) -> Path:
    from tiny_models import save_tiny_llama

    return save_tiny_llama(folder, en + de, hidden=32, layers=2, vocab=128)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_data(data: Path, en: list[str], de: list[str]) -> None:
    _jsonl(data / "eval" / "german.jsonl", [{"text": t} for t in de[:ITEMS]])
    _jsonl(data / "select" / "german.jsonl", [{"text": t} for t in de[ITEMS: 2 * ITEMS]])
    _jsonl(data / "eval" / "english_prose.jsonl", [{"text": t} for t in en[:ITEMS]])
    _jsonl(data / "select" / "english_prose.jsonl", [{"text": t} for t in en[ITEMS: 2 * ITEMS]])
    _jsonl(data / "eval" / "wordnet_mc.jsonl", [{"id": f"mc-{i}", "question": f"A word like {EN[i]}:",
                                                  "choices": [EN[i], EN[i + 1], DE[i], DE[i + 1]], "answer": i % 4}
                                                 for i in range(MC)])
    (data / "train").mkdir()
    (data / "train" / "german.txt").write_text("\n%\n".join(de[2 * ITEMS:]) + "\n")
    (data / "train" / "english.txt").write_text("\n%\n".join(en[2 * ITEMS:]) + "\n")
    (data / "train" / "english_fortunes.txt").write_text("\n%\n".join(en[ITEMS:]) + "\n")  # the English-only control's
    (data / "sizes.json").write_text(json.dumps({"eval": ITEMS, "select": ITEMS, "mc": MC, "seed": 0}))
