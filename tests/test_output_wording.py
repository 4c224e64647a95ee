"""Printed results say what they mean: size against dense in the right direction, the searched point as
``name = value``, the interpolation curve itself and not only its barrier."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from deltawise.cli import app
from deltawise.commands.delta import size_versus_dense
from eval_util import save_tiny_lm


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("wording")
    text = root / "t.txt"
    text.write_text("one fish two fish\n\nred fish blue fish\n\nthis one has a little star\n")
    return save_tiny_lm(root / "a", seed=0), save_tiny_lm(root / "b", seed=1), text


def test_size_versus_dense_names_the_direction():
    assert size_versus_dense(400, 100) == "4.00x smaller than dense"
    assert size_versus_dense(100, 200) == "2.00x larger than dense"
    assert size_versus_dense(100, 100) == "1.00x smaller than dense"


@pytest.mark.parametrize("rank, direction", [(1, "smaller"), (32, "larger")])
def test_extract_says_larger_when_the_adapter_outweighs_the_dense_delta(pair, tmp_path, rank, direction):
    """Rank 32 on 32-wide matrices stores A and B, more than the dense delta: that is "larger", not "0.68x smaller"."""
    a, b, _ = pair
    report = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["extract", str(b), "--base", str(a), "-o", str(tmp_path / "ad"), "--lora", "--rank", str(rank),
                                 "--report", str(report), "-q"])
    assert r.exit_code == 0, r.output
    tensors = json.loads(report.read_text())["tensors"]
    dense, stored = sum(t["dense_bytes"] for t in tensors), sum(t["stored_bytes"] for t in tensors)
    found = re.search(r"(\d+) bytes stored \((\d+\.\d\d)x (smaller|larger) than dense\)", r.output)
    assert found is not None, r.output
    assert int(found[1]) == stored and found[3] == direction
    assert float(found[2]) == pytest.approx(max(dense, stored) / min(dense, stored), abs=0.005)
    assert float(found[2]) > 1


def test_interpolate_prints_the_curve(pair, tmp_path):
    a, b, text = pair
    out = tmp_path / "curve.json"
    r = CliRunner().invoke(app, ["analyze", "interpolate", str(a), str(b), "--data", str(text), "--points", "3", "-o", str(out),
                                 "-q"])
    assert r.exit_code == 0, r.output
    curve = json.loads(out.read_text())
    for lam, loss, ppl in zip(curve["lambdas"], curve["loss"], curve["perplexity"]):
        assert re.search(rf"{lam:.2f}\s+│\s+{loss:.4f}\s+│\s+{ppl:.4g}", r.output), r.output
    assert "lambda" in r.output and "perplexity" in r.output and "loss barrier" in r.output
