"""``deltawise --version`` and the changelog's one home (CHANGELOG.md, pointed to from the README)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from typer.testing import CliRunner

import deltawise
from deltawise.cli import app, installed_version

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_installed_version_and_runs_no_command():
    try:
        expected = version("deltawise")
    except PackageNotFoundError:
        expected = deltawise.__version__
    assert installed_version() == expected
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"deltawise {expected}\n"


def test_version_flag_through_the_entry_point():
    done = subprocess.run([sys.executable, "-m", "deltawise", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"deltawise \d+\.\d+\.\d+\S*\n", done.stdout)


def test_changelog_lives_in_its_own_file():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog\n") and "\n## Unreleased\n" in changelog
    assert "`deltawise --version`" in changelog
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Changelog\n"):]
    assert "CHANGELOG.md" in section and "### Unreleased" not in readme and "## Unreleased" not in readme
