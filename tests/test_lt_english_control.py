"""The long language-transfer benchmark's English-only control (benchmarks/lt_methods.py): it trains on English
Debian fortunes (the German runs' genre, enough text that 400 steps see it once), drawn once and seeded, never from
fortunes-it's files that share the folder, and its record carries the text's sha256, so a record made on other
text is not taken for it."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lt_methods  # noqa: E402
import lt_records  # noqa: E402
import realtext  # noqa: E402  (examples/, on the path once lt_methods is imported)
from lt_methods import Data, Run  # noqa: E402

ENGLISH_ONLY = next(m for m in lt_methods.METHODS if m.english_only)


@pytest.mark.skipif(not (realtext.FORTUNES / "computers").is_file(), reason="Debian's fortunes package is not installed")
def test_the_control_text_is_every_english_fortune_drawn_once_and_seeded(tmp_path):
    path = lt_methods.english_fortunes(Data(tmp_path / "a"))
    texts = path.read_text(encoding="utf-8").rstrip("\n").split("\n%\n")
    assert len(texts) > 10_000 and len(set(texts)) == len(texts)  # 400 steps x 8 see about a quarter, once
    assert all(40 <= len(t) <= 400 for t in texts)
    people = set(realtext.fortunes(realtext.FORTUNES / "people", min_chars=40, max_chars=400))
    assert people <= set(texts)
    italian = realtext.FORTUNES / "formiche"  # fortunes-it's, in the same folder
    if italian.is_file():
        assert not set(realtext.fortunes(italian, min_chars=40, max_chars=400)) & set(texts)
    before = path.stat().st_mtime_ns
    assert lt_methods.english_fortunes(Data(tmp_path / "a")) == path and path.stat().st_mtime_ns == before  # drawn once
    assert lt_methods.english_fortunes(Data(tmp_path / "b")).read_bytes() == path.read_bytes()  # the same seed
    assert lt_methods.english_fortunes(Data(tmp_path / "c"), seed=1).read_bytes() != path.read_bytes()


def test_the_control_trains_on_its_text_and_its_record_names_the_text(tmp_path):
    data = Data(tmp_path / "data")
    data.english_fortunes.parent.mkdir(parents=True)
    data.english_fortunes.write_text("an english text\n%\nanother one\n")
    args = argparse.Namespace(work=tmp_path, steps=4, batch_size=2, max_length=32, budget=0.99, bam_rounds=4,
                              retain_budget=0.98, lr_sweep_examples=10)
    run = Run(ENGLISH_ONLY, ENGLISH_ONLY.usual, 0)
    assert lt_methods.settings(run, Path("base"), data, args)["data"] == data.english_fortunes
    found = lt_records.run_settings(run, args)
    assert found["english_text"] == hashlib.sha256(data.english_fortunes.read_bytes()).hexdigest()
    data.english_fortunes.write_text("other text\n")
    assert lt_records.run_settings(run, args)["english_text"] != found["english_text"]
    assert "english_text" not in lt_records.run_settings(Run(lt_methods.FULL, 1e-4, 0), args)
