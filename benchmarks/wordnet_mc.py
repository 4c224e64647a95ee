"""An English multiple-choice test from WordNet (Debian's ``wordnet`` package): gloss -> lemma.

Each item gives the definition of a common word's primary sense and asks for the word among four
choices; the three distractors are lemmas of other synsets of the same part of speech, drawn with a
seeded RNG, so the same files and seed always give the same items. Written as ``eval``'s
multiple-choice JSONL (``question``, ``choices``, ``answer`` = index of the right choice).

Which senses: a lemma's first sense in ``index.<pos>`` (WordNet orders senses by frequency in its
sense-tagged corpora), kept only when that lemma has at least ``min_tagged`` tagged senses, i.e. the
word occurs in running text. Lemmas are single lower-case alphabetic words of 3-14 letters (no
multi-word expressions, names or abbreviations), so choices look alike. The gloss's quoted example
sentences are dropped (they use the word itself), and a definition that still names its lemma is
skipped.

File formats: wndb(5WN) of WordNet 3.0 -- ``data.<pos>`` lines ``offset lex_filenum ss_type w_cnt
word lex_id ... p_cnt ptrs... | gloss`` (w_cnt in hex), ``index.<pos>`` lines ``lemma pos synset_cnt
p_cnt ptr_symbol... sense_cnt tagsense_cnt synset_offset...``; license and comment lines start with
spaces.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
WORD = re.compile(r"[a-z]{3,14}")


@dataclass(frozen=True)
class Synset:
    offset: str
    pos: str
    lemmas: tuple[str, ...]
    definition: str


def _lemma(word: str) -> str:
    return re.sub(r"\(.*\)$", "", word)  # adjectives carry a marker: "big(a)"


def read_synsets(folder: Path, pos: str) -> dict[str, Synset]:
    """Synsets of one part of speech by offset, with the gloss's definition (examples removed)."""
    synsets = {}
    for line in (folder / f"data.{POS_FILES[pos]}").read_text(encoding="utf-8", errors="replace").splitlines():
        if not line or line[0] == " ":
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        n_words = int(fields[3], 16)
        lemmas = tuple(_lemma(fields[4 + 2 * i]).lower() for i in range(n_words))
        definition = gloss.split(";")[0].strip()
        definition = re.sub(r'"[^"]*"', "", definition).strip(" ;:,")
        synsets[fields[0]] = Synset(fields[0], pos, lemmas, definition)
    return synsets


def primary_senses(folder: Path, pos: str, min_tagged: int) -> list[tuple[str, str]]:
    """(lemma, offset of its first sense) for lemmas with at least ``min_tagged`` tagged senses."""
    out = []
    for line in (folder / f"index.{POS_FILES[pos]}").read_text(encoding="utf-8", errors="replace").splitlines():
        if not line or line[0] == " ":
            continue
        fields = line.split()
        lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
        tagged = int(fields[5 + p_cnt])
        offsets = fields[6 + p_cnt: 6 + p_cnt + synset_cnt]
        if tagged >= min_tagged and WORD.fullmatch(lemma) and offsets:
            out.append((lemma, offsets[0]))
    return out


def build_items(folder: Path = WORDNET, n_items: int = 400, seed: int = 0, n_choices: int = 4,
                min_tagged: int = 1, parts_of_speech: str = "nvar") -> list[dict]:
    """``n_items`` gloss -> lemma items (fewer when the files have fewer eligible senses), seeded."""
    missing = [f"data.{POS_FILES[pos]}" for pos in parts_of_speech if not (folder / f"data.{POS_FILES[pos]}").is_file()]
    if missing:
        raise SystemExit(f"WordNet's {', '.join(missing)} not found in {folder}: install Debian's WordNet database "
                         f"('apt-get install wordnet-base') or give the folder that holds it")
    rng = random.Random(seed)
    candidates: list[tuple[str, Synset]] = []
    pools: dict[str, list[str]] = {}
    for pos in parts_of_speech:
        synsets = read_synsets(folder, pos)
        senses = [(lemma, synsets[off]) for lemma, off in primary_senses(folder, pos, min_tagged) if off in synsets]
        pools[pos] = sorted({lemma for lemma, _ in senses})
        candidates += [(lemma, s) for lemma, s in senses
                       if s.definition and not re.search(rf"\b{re.escape(lemma)}", s.definition.lower())]
    candidates.sort(key=lambda c: (c[1].pos, c[0]))
    rng.shuffle(candidates)
    items, used_definitions = [], set()
    for lemma, synset in candidates:
        if len(items) == n_items:
            break
        if synset.definition in used_definitions:
            continue  # two lemmas of one synset would make two items with the same question
        # a distractor must not be a synonym (another lemma of the answer's synset)
        pool = [w for w in pools[synset.pos] if w not in synset.lemmas]
        if len(pool) < n_choices - 1:
            continue
        used_definitions.add(synset.definition)
        choices = rng.sample(pool, n_choices - 1)
        answer = rng.randrange(n_choices)
        choices.insert(answer, lemma)
        items.append({"id": f"wn-{synset.pos}-{synset.offset}", "question": f"A word that means \"{synset.definition}\":",
                      "choices": choices, "answer": answer})
    return items


def write_items(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    return path
