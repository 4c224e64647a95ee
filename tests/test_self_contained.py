"""The shipped code and docs stand on their own: no citation of the reading aids kept next to the
repository (its methods, design and style notes) and no path that leads out of the repository.

Methods cite their papers (authors, year, arXiv id); our own choices cite docs/*.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a user receives: the package, its docs, the benchmarks with their results, examples, scripts.
SCANNED = ("src", "docs", "benchmarks", "examples", "scripts", "README.md")
SKIPPED_DIRS = {"__pycache__", ".pytest_cache"}
# Built as patterns so that this file does not itself contain the names it forbids (a plain grep
# of the tree for them must come back empty).
FORBIDDEN = re.compile(
    r"\b(?:METHODS|DESIGN|STYLE)\.md\b"  # notes that live outside the repository
    r"|\.\./+shared\b"  # a relative path out of the checkout into the shared folder
    r"|(?<![\w.-])/work/"  # an absolute path of the machine the project was written on
)


def scanned_files(root: Path) -> list[Path]:
    """Every text file under the scanned folders of ``root`` (binary files, such as a built
    extension, are skipped: they are not prose anyone reads)."""
    files: list[Path] = []
    for name in SCANNED:
        top = root / name
        candidates = [top] if top.is_file() else sorted(top.rglob("*")) if top.is_dir() else []
        for path in candidates:
            if path.is_file() and not SKIPPED_DIRS.intersection(path.relative_to(root).parts):
                files.append(path)
    return files


def offending_lines(root: Path) -> list[str]:
    """``path:line: text`` for every line under ``root``'s scanned folders that cites a note outside
    the repository or a path out of it."""
    found: list[str] = []
    for path in scanned_files(root):
        data = path.read_bytes()
        if b"\0" in data:
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if FORBIDDEN.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_repository_cites_nothing_outside_itself():
    assert scanned_files(REPO), "nothing was scanned: the repository layout changed"
    found = offending_lines(REPO)
    assert not found, "cite the paper or a docs/*.md section instead of:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        "See " + "METHODS" + ".md §14 for the scale rule.",
        "as " + "DESIGN" + ".md measured",
        "data in ../" + "shared/corpus",
        "python /" + "work/main/.venv/bin/python",
    ],
)
def test_scanner_reports_a_citation_outside_the_repository(tmp_path, line):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "mod.py").write_text(f'"""Doc."""\n# {line}\n', encoding="utf-8")
    (tmp_path / "README.md").write_text("# Title\n", encoding="utf-8")
    assert offending_lines(tmp_path) == [f"src/pkg/mod.py:2: # {line}"]


def test_scanner_accepts_papers_docs_and_ordinary_paths(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "merging.md").write_text(
        "TIES (Yadav et al. 2023, arXiv 2306.01708); see docs/deltas.md.\n"
        "A reference like ../x or ./model is a local path; men-women/work/people is a category.\n",
        encoding="utf-8",
    )
    # a built extension may embed build paths; it is binary and not read
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "_ext.so").write_bytes(b"\0ELF /" + b"work/main/build\0")
    (tmp_path / "src" / "__pycache__").mkdir()
    (tmp_path / "src" / "__pycache__" / "m.txt").write_text("METHODS" + ".md", encoding="utf-8")
    assert offending_lines(tmp_path) == []
