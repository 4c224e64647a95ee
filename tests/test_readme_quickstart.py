"""The README's quick start, run as written: the fenced block after ``<!-- quickstart -->`` is taken from
README.md and run by bash on a tiny Llama and two fine-tunes of it, with the documented variables (BASE, FT1,
FT2, OLD, NEW) set, so the README cannot drift from the commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from adapt_util import DOCS, tiny_lm  # noqa: F401
from conftest import perturb

import deltawise

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- quickstart -->"
VARIABLES = ("BASE", "FT1", "FT2", "OLD", "NEW")


def quickstart_block() -> str:
    text = README.read_text()
    assert text.count(MARKER) == 1, f"README.md needs exactly one {MARKER}"
    found = re.match(r"\s*```bash\n(.*?)\n```", text[text.index(MARKER) + len(MARKER):], re.S)
    assert found, f"a ```bash block must follow {MARKER}"
    return found.group(1)


def test_quickstart_names_only_the_documented_variables():
    used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", quickstart_block()))
    assert used == set(VARIABLES)
    intro = README.read_text().split(MARKER)[0].rsplit("## Quick start", 1)[1]
    assert all(f"`{name}`" in intro for name in VARIABLES)  # each one is explained before the block


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tiny_lm, tmp_path):  # noqa: F811
    base = tiny_lm["model"]
    old = tmp_path / "old.txt"
    old.write_text("\n\n".join(DOCS[::2]) + "\n")
    new = tmp_path / "new.txt"
    new.write_text("\n\n".join(DOCS[1::2]) + "\n")
    env = {**os.environ, "BASE": str(base), "FT1": str(perturb(base, tmp_path / "ft1", seed=1)),
           "FT2": str(perturb(base, tmp_path / "ft2", seed=2)), "OLD": str(old), "NEW": str(new),
           "PYTHONPATH": os.pathsep.join([str(Path(deltawise.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "DELTAWISE_PYTHON": sys.executable}
    work = tmp_path / "work"
    work.mkdir()
    # `deltawise` is this interpreter's package (the code under test), whatever is installed on PATH
    script = 'deltawise() { "$DELTAWISE_PYTHON" -m deltawise "$@"; }\n' + quickstart_block()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for made in ("merged/model.safetensors", "adapter/adapter_model.safetensors", "report.html"):
        assert (work / made).is_file(), made
    for name in ("adapted.json", "merged.json"):
        forgetting = json.loads((work / name).read_text())["forgetting"]
        assert forgetting["source_retention_ci"] and forgetting["target_gain_ci"], name
    weights = json.loads((work / "weights.json").read_text())
    assert [m["name"] for m in weights["models"]] == ["adapter", "merged"]
    assert all(m["delta_norm"] > 0 for m in weights["summary"]["models"])
    html = (work / "report.html").read_text()
    assert "adapted" in html and "merged" in html
