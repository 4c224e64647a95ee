"""benchmarks/wordnet_mc.py: gloss -> lemma items from WordNet database files (a tiny fake WordNet here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import wordnet_mc  # noqa: E402

from deltawise.data.read import load_items  # noqa: E402

LICENSE = "  1 This software and database is being provided to you, the LICENSEE\n  2 more licence text  \n"
# offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [ptr]... | gloss
DATA_NOUN = LICENSE + "\n".join([
    '00000101 05 n 02 dog 0 domestic_dog 0 000 | a domesticated carnivorous mammal; "the dog barked all night"',
    '00000202 05 n 01 cat 0 001 @ 00000101 n 0000 | a small feline kept as a pet; "the cat purred"',
    '00000303 05 n 01 bird 0 000 | a warm-blooded egg-laying vertebrate with feathers',
    '00000404 05 n 01 horse 0 000 | a large animal that people ride',
    '00000505 05 n 01 table 0 000 | a piece of furniture with a flat top',
    '00000606 05 n 01 chair 0 000 | a seat for one person, a chair with a back',  # names its own lemma: skipped
    '00000707 05 n 01 river 0 000 | a large natural stream of water',
    '00000808 05 n 01 aardwolf 0 000 | a striped hyena-like mammal of Africa',
    '00000909 05 n 01 canis 0 000 | type genus of the family Canidae',
]) + "\n"
# lemma pos synset_cnt p_cnt [ptr_symbol]... sense_cnt tagsense_cnt synset_offset...
INDEX_NOUN = LICENSE + "\n".join([
    "aardwolf n 1 0 1 0 00000808",  # never tagged in running text: not a common word
    "bird n 1 0 1 3 00000303",
    "canis n 1 0 1 1 00000909",
    "cat n 1 1 @ 1 5 00000202",
    "chair n 1 0 1 4 00000606",
    "dog n 2 0 2 9 00000101 00000909",
    "domestic_dog n 1 0 1 1 00000101",  # not a single word
    "horse n 1 0 1 2 00000404",
    "river n 1 0 1 2 00000707",
    "table n 1 0 1 6 00000505",
]) + "\n"


def fake_wordnet(folder: Path) -> Path:
    (folder / "data.noun").write_text(DATA_NOUN)
    (folder / "index.noun").write_text(INDEX_NOUN)
    return folder


def test_items_are_the_primary_sense_with_distractors_from_other_synsets(tmp_path):
    items = wordnet_mc.build_items(fake_wordnet(tmp_path), n_items=100, seed=3, parts_of_speech="n")
    by_answer = {item["choices"][item["answer"]]: item for item in items}
    # eligible: tagged single-word lemmas whose definition does not name them (not chair, aardwolf, domestic_dog)
    assert sorted(by_answer) == ["bird", "canis", "cat", "dog", "horse", "river", "table"]
    dog = by_answer["dog"]
    assert dog["question"] == 'A word that means "a domesticated carnivorous mammal":'  # the example sentence is gone
    assert dog["id"] == "wn-n-00000101"
    for answer, item in by_answer.items():
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        distractors = set(item["choices"]) - {answer}
        assert answer not in distractors
        assert distractors <= {"bird", "canis", "cat", "chair", "dog", "horse", "river", "table", "aardwolf"} - {answer}
        assert "aardwolf" not in distractors  # the distractor pool is the tagged lemmas too


def test_items_are_seeded_and_read_by_eval_as_multiple_choice(tmp_path):
    folder = fake_wordnet(tmp_path)
    first = wordnet_mc.build_items(folder, n_items=5, seed=7, parts_of_speech="n")
    assert first == wordnet_mc.build_items(folder, n_items=5, seed=7, parts_of_speech="n")
    assert len(first) == 5
    seeds = {tuple(i["id"] for i in wordnet_mc.build_items(folder, n_items=5, seed=s, parts_of_speech="n")) for s in range(6)}
    assert len(seeds) > 1  # another seed draws other items or another order
    path = wordnet_mc.write_items(tmp_path / "mc.jsonl", first)
    items = load_items(path, require=("choices", "answer"))
    assert [i.id for i in items] == [r["id"] for r in first]
    assert all(isinstance(i.fields["answer"], int) and i.fields["choices"][i.fields["answer"]] for i in items)


def test_missing_database_files_are_named_with_the_package_to_install(tmp_path):
    with pytest.raises(SystemExit, match=r"data\.noun.*not found.*apt-get install wordnet-base"):
        wordnet_mc.build_items(tmp_path, n_items=4)
