"""The HTML report from fixture JSON: content checks, then rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltawise.cli import app
from deltawise.errors import InputError
from deltawise.report.html import build_report
from deltawise.report.layers import layer_profiles
from deltawise.report.runs import short_labels

FIXTURES = Path(__file__).parent / "fixtures" / "report"
FIGURES = ["fig-tradeoff", "fig-budget-search", "fig-interpolation", "fig-layers"]
TABLES = ["table-eval", "table-forgetting", "table-budget-search", "table-heldout-search", "table-interpolation",
          "table-weights", "table-sources"]
LAMBDAS = (0.25, 0.5, 1.0)


def write_budget(folder: Path) -> Path:
    """A budget search's JSON as search/budget.py writes it: three points, lambda=1 over budget, 0.5 chosen."""
    from deltawise.search.budget import BudgetResult, Candidate

    cands = [Candidate({"lambda": lam}, {"en": ret}, {"de": tgt}, {"en": 20 / ret, "de": 30 / tgt}, {"en": ret - 0.02},
                       {"en": [ret - 0.025, ret + 0.025], "de": [tgt - 0.1, tgt + 0.1]}, feasible=ret - 0.02 >= 0.98)
             for lam, ret, tgt in zip(LAMBDAS, (1.02, 1.0, 0.9), (1.1, 1.3, 1.5))]
    cands[1].pareto = cands[2].pareto = cands[0].pareto = True
    result = BudgetResult("task_arithmetic", {"lambda": list(LAMBDAS)}, {"en": 0.98}, "/models/base",
                          {"en": 20.0, "de": 30.0}, cands, chosen=1, out=Path("/models/ft-small"),  # as if it wrote ft-small
                          intervals={"level": 0.95},
                          heldout={"retention": {"en": 0.99}, "retention_ci": {"en": [0.97, 1.01]}, "target": {"de": 1.25},
                                   "target_ci": {"de": [1.15, 1.35]}, "within_budget": True, "forgetting": None})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "search.json").write_text(json.dumps(result.to_json()))
    return folder / "search.json"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "report.html"
    r = CliRunner().invoke(app, ["report", str(FIXTURES / "base"), str(FIXTURES / "ft-small"), str(FIXTURES / "ft-large"),
                                 str(FIXTURES / "analysis"), str(write_budget(tmp / "budget")), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_report_is_self_contained(report):
    html = report.read_text()
    for element in FIGURES + TABLES:
        assert f'id="{element}"' in html
    for fig in FIGURES:  # each figure holds an inline SVG
        assert re.search(rf'<figure id="{fig}" class="plot"><svg', html)
    assert "<script" not in html and "<link" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)  # nothing fetched from a network
    assert "ft-large" in html and "ft-small" in html


def test_report_lists_forgetting_per_run(report):
    html = report.read_text()
    forgetting = html[html.index('id="table-forgetting"') : html.index("</table>", html.index('id="table-forgetting"'))]
    assert forgetting.count("<tr>") == 3  # header + the two runs with a baseline


def _table(html: str, table_id: str) -> list[list[str]]:
    """The cells of each row of the table ``table_id`` (header first)."""
    start = html.index(f'id="{table_id}"')
    body = html[start : html.index("</table>", start)]
    return [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_report_gives_rates_across_models_once_per_run_not_on_every_model_row(report):
    html = report.read_text()
    per_model = _table(html, "table-weights")
    assert per_model[0] == ["run", "model", "‖Δ‖", "relative", "intruders", "matrices"]
    assert [row[1] for row in per_model[1:]] == ["ft-small", "ft-large"]
    across = _table(html, "table-weights-across")
    assert across == [["run", "models", "sign conflicts", "selfish", "catastrophic"],
                      ["weights", "ft-small, ft-large", "0.5008", "0.8413", "0"]]


def test_short_labels_are_the_shortest_distinguishing_suffix():
    assert short_labels([Path("/r/base.json"), Path("/r/lora.json")]) == ["base", "lora"]
    # the same file name in every run folder: the folders name the runs
    assert short_labels([Path("/x/base/eval.json"), Path("/x/ft/eval.json"), Path("/x/an/weights.json")]) == \
        ["base", "ft", "weights"]
    assert short_labels([Path("/a/ft/eval.json"), Path("/b/ft/eval.json")]) == ["a/ft", "b/ft"]
    labels = short_labels([Path("/r/a/eval.json"), Path("/r/a.json"), Path("/r/b/eval.json")])
    assert len(set(labels)) == 3 and all(lab.endswith(("a", "b", "eval")) for lab in labels)


def test_report_labels_runs_by_name_with_the_path_as_tooltip(report):
    html = report.read_text()
    rows = _table(html, "table-forgetting")
    assert [r[:2] for r in rows[1:]] == [["ft-small", "base"], ["ft-large", "base"]]
    assert '<td title="/models/base">base</td>' in html  # the baseline model, named by the run that evaluated it
    assert re.search(r'<td title="[^"]*tests/fixtures/report/ft-small/eval.json">ft-small</td>', html)
    assert "/models/" not in "".join(re.findall(r"<figure.*?</figure>", html, re.S))  # no paths in the figures


def test_report_shows_the_budget_search(report):
    html = report.read_text()
    rows = _table(html, "table-budget-search")
    assert rows[0][0] == "lambda" and rows[0][1] == "retention en [lower bound ≥ 0.98]"
    assert [r[0] for r in rows[1:]] == ["0.25", "0.5", "1"]
    assert [r[-3:] for r in rows[1:]] == [["yes", "★", ""], ["yes", "★", "←"], ["no", "★", ""]]
    assert rows[3][1] == "0.900 [0.880]"
    held = _table(html, "table-heldout-search")
    assert held[1] == ["retention en", "0.990 [0.970, 1.010]", "≥ 0.98"]
    assert "it meets the budget" in html
    tradeoff = html[html.index('id="fig-tradeoff"') : html.index("</figure>", html.index('id="fig-tradeoff"'))]
    # every searched point is annotated, the budget line is in the legend
    for lam in ("0.25", "0.5 (chosen)", "1"):
        assert f"lambda={lam}" in tradeoff
    assert "retention budget 0.98" in tradeoff and "Pareto front" in tradeoff


def test_report_leaves_out_sections_without_data(tmp_path):
    build_report([FIXTURES / "analysis" / "weights.json"], tmp_path / "w.html")
    html = (tmp_path / "w.html").read_text()
    assert "<h2>Where each delta sits</h2>" in html and 'id="fig-layers"' in html
    for absent in ("Forgetting", "Evaluations", "Interpolation", "Retention-budget", "No data"):
        assert absent not in html, absent
    build_report([FIXTURES / "base", FIXTURES / "ft-small"], tmp_path / "e.html")
    html = (tmp_path / "e.html").read_text()
    assert "<h2>Forgetting</h2>" in html and "Interpolation" not in html and "delta sits" not in html
    assert "Hollow points" not in html  # the caption speaks of budget points only when there are some


def test_layer_profiles_sum_each_layers_tensors():
    from deltawise.analyze.results import WeightsAnalysis

    data = json.loads((FIXTURES / "analysis" / "weights.json").read_text())
    profiles = layer_profiles(WeightsAnalysis.model_validate(data))
    assert [p.model for p in profiles] == ["ft-small", "ft-large"]
    for i, p in enumerate(profiles):
        assert p.layers == [0, 1]
        for layer in p.layers:
            inside = [t for t in data["tensors"] if t["name"].startswith(f"model.layers.{layer}.")]
            delta = math.sqrt(sum(t["deltas"][i]["norm"] ** 2 for t in inside))
            base = math.sqrt(sum(t["base_norm"] ** 2 for t in inside))
            assert p.relative[layer] == pytest.approx(delta / base)
            assert p.intruders[layer] == sum(t["intruders"][i]["count"] for t in inside if t["intruders"])
            # a ratio of root sums of squares lies between its tensors' own ratios
            own = [t["deltas"][i]["norm"] / t["base_norm"] for t in inside]
            assert min(own) <= p.relative[layer] <= max(own)
    assert sum(sum(p.intruders) for p in profiles) == sum(m["intruders"] for m in data["summary"]["models"])


def test_report_shows_the_intervals_of_runs_that_have_them(tmp_path):
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.results import DatasetResult, EvalResult

    def run(name, items):
        ds = DatasetResult(name="qa", role="source", task="classification", path="qa", metric="accuracy",
                           value=sum(items.values()) / len(items), higher_is_better=True, per_item=items)
        return EvalResult(model=name, fingerprint=name, created="2026-01-01T00:00:00+00:00", datasets=[ds])

    base = run("base", {str(i): 1.0 for i in range(50)})
    ft = run("ft", {str(i): float(i % 5 != 0) for i in range(50)})
    ft.forgetting = forgetting(ft, base)
    base.save(tmp_path / "base.json")
    ft.save(tmp_path / "ft.json")
    build_report([tmp_path / "base.json", tmp_path / "ft.json"], tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    lo, hi = ft.forgetting.forgetting_score_ci
    assert f"20.0 [{lo:.1f}, {hi:.1f}]" in html and "95% paired bootstrap interval" in html


def test_report_refuses_folder_without_results(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(InputError, match="no deltawise results"):
        build_report([tmp_path], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------- browser
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed and could not be (scripts/setup installs it with apt-get when run as root)")
    return path


def run_chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", *extra, page.resolve().as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def console_errors(stderr: str) -> list[str]:
    """Console messages Chromium logs at warning/error level (``CONSOLE`` lines), and uncaught exceptions."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line or ":WARNING:" in line)]


def test_console_error_detector_catches_an_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>console.error('boom'); undefinedFunction();</script></body></html>")
    proc = run_chromium(bad, tmp_path, "--dump-dom")
    assert console_errors(proc.stderr), proc.stderr[-2000:]


def test_report_renders_in_chromium(report, tmp_path):
    dom = run_chromium(report, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for element in FIGURES:
        assert re.search(rf'<figure id="{element}" class="plot"><svg', dom.stdout), element
    for element in TABLES:
        assert f'id="{element}"' in dom.stdout
    for heading in ("Forgetting", "Retention-budget search: search", "Evaluations", "Where each delta sits",
                    "Interpolation curves", "Sources"):
        assert f"<h2>{heading}</h2>" in dom.stdout, heading
    assert console_errors(dom.stderr) == []

    shot = tmp_path / "shot.png"
    proc = run_chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1200,4000", "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    assert console_errors(proc.stderr) == []
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    dark = (pixels.mean(axis=-1) < 0.6).mean()
    assert 0.005 < dark < 0.5, f"screenshot looks blank or broken ({dark:.4f} of pixels are dark)"
    keep = Path("/tmp/deltawise-report-screenshot.png")  # for a person to look at; not a test output
    shutil.copy(shot, keep)
