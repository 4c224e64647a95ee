"""Real text that every Debian machine can have offline: fortune files and English prose.

Used by the demo and the real-model benchmarks.

What is here
    * ``ensure_fortunes`` installs the Debian fortune packages a benchmark needs when their files
      are absent (``apt-get install``, as root), or says exactly what to install.
    * ``fortunes(path)`` reads one fortune file or every file of a language folder into entries
      (separated by lines holding ``%``), whitespace-normalised, with a length window.
    * ``english_prose`` gives English paragraphs that do not share the fortunes' format: the
      licence texts every Debian has and the docstrings of Python's standard library. This is the
      *source* ability the language-transfer benchmark tries to keep (see ``source_texts``).
    * ``split_balanced`` makes seeded, class-balanced train/validation/test splits.
"""

from __future__ import annotations

import inspect
import os
import pkgutil
import random
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from deltawise.data.read import split_documents
from deltawise.errors import InputError

FORTUNES = Path("/usr/share/games/fortunes")
LICENSES = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0", "Artistic")]
# Files that are pictures, IRC logs or offensive variants rather than prose.
SKIP = {"asciiart", "ascii-art", "art", "channel-debian.fortunes", "off"}
STDLIB_MODULES = ("argparse", "asyncio", "collections", "concurrent", "contextlib", "csv", "dataclasses", "decimal",
                  "email", "functools", "http", "importlib", "inspect", "itertools", "json", "logging", "multiprocessing",
                  "pathlib", "pickle", "re", "shutil", "socket", "sqlite3", "subprocess", "threading", "typing",
                  "unittest", "urllib", "xml", "zipfile")


def ensure_fortunes(packages: Sequence[str], say=print) -> None:
    """Install the Debian packages (``fortunes``, ``fortunes-de``, ...) whose files are missing."""
    missing = [p for p in packages if not _package_path(p).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise InputError(f"missing fortune files; install them first: sudo apt-get install -y {' '.join(missing)}")
    say(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # an old package index: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise InputError(f"apt-get install {' '.join(missing)} failed:\n{proc.stderr[-800:]}")


def _package_path(package: str) -> Path:
    if package == "fortunes":
        return FORTUNES / "computers"
    return FORTUNES / package.removeprefix("fortunes-")


def _entries(text: str) -> list[str]:
    # the package's one splitting rule, so the demo and benchmarks cut fortunes as train/eval read them
    return [re.sub(r"\s+", " ", e).strip() for e in split_documents(text)]


def fortunes(path: Path, min_chars: int = 20, max_chars: int = 500) -> list[str]:
    """Entries of a fortune file, or of every prose file in a folder, deduplicated, in file order."""
    if not path.exists():
        raise InputError(f"{path} is missing: install the Debian fortune package that has it "
                         "(e.g. sudo apt-get install fortunes-de)")
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir()
        if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8") and f.name not in SKIP)
    if not files:
        raise InputError(f"{path}: no fortune files (is the Debian package installed?)")
    seen, out = set(), []
    for f in files:
        for entry in _entries(f.read_text(encoding="utf-8", errors="replace")):
            if min_chars <= len(entry) <= max_chars and entry not in seen:
                seen.add(entry)
                out.append(entry)
    return out


def _paragraphs(text: str, min_chars: int, max_chars: int) -> Iterable[str]:
    for block in re.split(r"\n\s*\n", text):
        para = re.sub(r"\s+", " ", block).strip()
        letters = sum(c.isalpha() for c in para)
        # prose, not code, tables or headings
        if min_chars <= len(para) <= max_chars and not para.isupper() and letters > 0.7 * len(para) and ">>>" not in para:
            yield para


def english_prose(min_chars: int = 200, max_chars: int = 700) -> list[str]:
    """English paragraphs of formal prose: licence texts and Python standard-library docstrings."""
    paras: list[str] = []
    for f in LICENSES:
        if f.is_file():
            paras += _paragraphs(f.read_text(encoding="utf-8", errors="replace"), min_chars, max_chars)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            paras += _module_docs(name, min_chars, max_chars)
    return list(dict.fromkeys(paras))


def _module_docs(name: str, min_chars: int, max_chars: int) -> list[str]:
    import importlib

    try:
        module = importlib.import_module(name)
    except Exception:
        return []
    objects = [module]
    if hasattr(module, "__path__"):
        for info in pkgutil.iter_modules(module.__path__, name + "."):
            if "test" in info.name or "__main__" in info.name or "idle" in info.name:
                continue
            try:
                objects.append(importlib.import_module(info.name))
            except Exception:
                continue
    docs = []
    for obj in objects:
        for member in [obj, *(v for _, v in inspect.getmembers(obj) if inspect.isclass(v) or inspect.isfunction(v))]:
            doc = inspect.getdoc(member) if getattr(member, "__module__", obj.__name__) == obj.__name__ else None
            if doc:
                docs += _paragraphs(doc, min_chars, max_chars)
    return docs


def split_balanced(classes: dict[str, list[str]], per_class: tuple[int, int, int], seed: int) -> dict[str, list[dict]]:
    """Seeded train/validation/test rows ``{"text", "label"}`` with at most ``per_class`` items of each class
    in each split; small classes give up training items first so the evaluation splits stay full."""
    rng = random.Random(seed)
    n_train, n_val, n_test = per_class
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for label, texts in classes.items():
        texts = list(texts)
        rng.shuffle(texts)
        test, val, train = texts[:n_test], texts[n_test:n_test + n_val], texts[n_test + n_val:n_test + n_val + n_train]
        splits["test"] += [{"text": t, "label": label} for t in test]
        splits["validation"] += [{"text": t, "label": label} for t in val]
        splits["train"] += [{"text": t, "label": label} for t in train]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits
