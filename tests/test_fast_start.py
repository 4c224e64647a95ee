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


# --- what a merge imports -----------------------------------------------------------------------------------------------

NOT_ON_THE_MERGE_PATH = ("transformers", "peft", "accelerate", "matplotlib", "scipy", "psutil")
OTHER_COMMANDS = ("deltawise.commands.train", "deltawise.commands.eval", "deltawise.commands.analyze",
                  "deltawise.commands.sweep", "deltawise.commands.search")


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (which may end the process: read at exit)."""
    report = "import atexit, sys\natexit.register(lambda: print('MODULES', *sorted(sys.modules), file=sys.stderr))\n"
    proc = subprocess.run([sys.executable, "-c", report + code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return set(next(line for line in proc.stderr.splitlines() if line.startswith("MODULES")).split()[1:])


def _tiny_pair(root):
    import torch
    from safetensors.torch import save_file

    for i in range(2):
        folder = root / f"m{i}"
        folder.mkdir()
        save_file({"a.weight": torch.full((4, 4), float(i)), "b.bias": torch.arange(4.0) * i}, str(folder / "model.safetensors"))
    recipe = root / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {root / 'm0'}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {root / 'm1'}\n    parameters: {{weight: 3.0}}\ndtype: float32\n")
    return recipe


def test_a_merge_through_the_command_line_imports_only_what_it_needs(tmp_path):
    """A whole `deltawise merge` (entry point, background torch import, the merge, the written output) imports no
    transformers, PEFT, accelerate, matplotlib, scipy or psutil, none of the other commands' modules, and not the SVD
    of adapter outputs."""
    recipe = _tiny_pair(tmp_path)
    out = tmp_path / "out"
    modules = _modules_after(f"sys.argv = ['deltawise', 'merge', {str(recipe)!r}, {str(out)!r}, '-q']\n"
                             "from deltawise.launch import main\nmain()\n")
    assert "deltawise.merge.engine" in modules and "torch" in modules  # it did merge
    assert not {m.split(".")[0] for m in modules} & set(NOT_ON_THE_MERGE_PATH)
    assert not modules & {*OTHER_COMMANDS, "deltawise.delta.lora_extract"}
    from safetensors.torch import load_file

    merged = load_file(str(out / "model.safetensors"))  # linear, weights 1 and 3 normalised: (0*1 + 1*3) / 4
    assert merged["a.weight"].eq(0.75).all() and merged["b.bias"].tolist() == [0.0, 0.75, 1.5, 2.25]


def test_the_library_merge_imports_no_command_line_and_no_heavy_extras():
    modules = _modules_after("import deltawise.merge\n")
    assert not {m.split(".")[0] for m in modules} & {*NOT_ON_THE_MERGE_PATH, "typer", "rich"}


@pytest.mark.parametrize("args", [("merge", "--help"), ("methods", "--help")])
def test_a_command_help_imports_only_its_own_command_module(args):
    modules = _modules_after(f"sys.argv = ['deltawise', *{list(args)!r}]\nfrom deltawise.launch import main\nmain()\n")
    assert "deltawise.commands.merge" in modules
    assert not modules & set(OTHER_COMMANDS)
    assert "torch" not in modules and "pydantic" in modules  # the option groups are pydantic models


def test_every_command_is_registered_for_help_and_in_order():
    """`deltawise --help` and `from deltawise.cli import app` see every command, in COMMAND_MODULES' order, whatever a
    partial registration (one command's run) did first."""
    code = ("from deltawise import cli\ncli.register_commands('bam')\nfirst = sorted(cli._command_names(cli._app))\n"
            "names = [i.name or i.callback.__name__ for i in cli.app.registered_commands]\n"
            "print(first)\nprint(names)\nprint([g.name for g in cli.app.registered_groups])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    first, names, groups = proc.stdout.splitlines()
    assert "bam" in first and "report" not in first  # stopped after the module that provides `bam`
    assert names.startswith("['merge', 'budget', 'verify', 'methods', 'extract'") and "'lr-sweep'" in names
    assert groups == "['analyze']"


@pytest.mark.parametrize(("args", "expected"), [
    ([], None), (["--help"], None), (["--version"], None), (["merge", "r.yaml"], "merge"),
    (["--version", "eval"], "eval"), (["analyze", "weights", "-h"], "analyze"),
])
def test_command_in(args, expected):
    from deltawise.cli import command_in

    assert command_in(args) == expected


def test_an_unknown_command_lists_every_command():
    proc = _entry_point("merg")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr and "merge" in proc.stderr
