"""The fast start: help and the version import no torch; a command starts importing torch early, in the background."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deltawise.launch import needs_torch

REPORT_MODULES = ("import atexit, sys\n"
                  "atexit.register(lambda: print('IMPORTED', sorted(m for m in ('torch', 'transformers', 'numpy') "
                  "if m in sys.modules), file=sys.stderr))\n")


def _entry_point(*args: str) -> subprocess.CompletedProcess:
    """Run the console entry point (``deltawise.launch:main``) with ``args`` in a fresh interpreter."""
    code = REPORT_MODULES + f"sys.argv = ['deltawise', *{list(args)!r}]\nfrom deltawise.launch import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def _imported(proc: subprocess.CompletedProcess) -> str:
    return next(line for line in proc.stderr.splitlines() if line.startswith("IMPORTED"))


@pytest.mark.parametrize("args", [("--version",), ("--help",), ("merge", "--help"), ()])
def test_help_and_version_import_no_torch(args):
    proc = _entry_point(*args)
    assert proc.returncode in (0, 2), proc.stderr  # a bare `deltawise` prints help and exits 2 (click)
    assert "deltawise" in proc.stdout + proc.stderr
    assert _imported(proc) == "IMPORTED []"


def test_a_command_starts_importing_torch_in_a_background_thread():
    code = ("import sys\nfrom deltawise.launch import start_early_imports\n"
            "assert start_early_imports(['--help']) is None and 'torch' not in sys.modules\n"
            "thread = start_early_imports(['merge', 'r.yaml', 'out'])\nassert thread.daemon\nthread.join()\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_an_early_error_ends_cleanly_while_torch_imports(tmp_path):
    """A command that fails before it needs torch (a missing recipe) prints its one-line error and exits 1, whether or
    not the background import has finished."""
    proc = _entry_point("merge", str(tmp_path / "missing.yaml"), str(tmp_path / "out"))
    assert proc.returncode in (1, 2), proc.stderr
    assert "missing.yaml" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "expected"), [
    ([], False), (["--version"], False), (["--help"], False), (["merge", "--help"], False), (["train", "-h"], False),
    (["merge", "r.yaml", "out"], True), (["eval", "model", "--source", "en.txt"], True),
])
def test_needs_torch(args, expected):
    assert needs_torch(args) is expected
