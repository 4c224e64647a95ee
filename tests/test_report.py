"""The HTML report from fixture JSON: content checks, then rendered in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltawise.cli import app
from deltawise.errors import InputError
from deltawise.report.html import build_report

FIXTURES = Path(__file__).parent / "fixtures" / "report"
FIGURES = ["fig-tradeoff", "fig-interpolation", "fig-layer-deltas", "fig-intruders"]
TABLES = ["table-eval", "table-forgetting", "table-interpolation", "table-weights"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    r = CliRunner().invoke(app, ["report", str(FIXTURES / "base"), str(FIXTURES / "ft-small"), str(FIXTURES / "ft-large"),
                                 str(FIXTURES / "analysis"), "-o", str(out)])
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
    return [re.findall(r"<t[hd]>(.*?)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_report_gives_rates_across_models_once_per_run_not_on_every_model_row(report):
    html = report.read_text()
    per_model = _table(html, "table-weights")
    assert per_model[0] == ["run", "model", "‖Δ‖", "relative", "intruders", "matrices"]
    assert [row[1] for row in per_model[1:]] == ["ft-small", "ft-large"]
    across = _table(html, "table-weights-across")
    assert across == [["run", "models", "sign conflicts", "selfish", "catastrophic"],
                      ["analysis/weights", "ft-small, ft-large", "0.5008", "0.8413", "0"]]


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
    assert f"20 [{lo:.4g}, {hi:.4g}]" in html and "95% paired bootstrap interval" in html


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
    assert console_errors(dom.stderr) == []

    shot = tmp_path / "shot.png"
    proc = run_chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    assert console_errors(proc.stderr) == []
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    dark = (pixels.mean(axis=-1) < 0.6).mean()
    assert 0.005 < dark < 0.5, f"screenshot looks blank or broken ({dark:.4f} of pixels are dark)"
    keep = Path("/tmp/deltawise-report-screenshot.png")  # for a person to look at; not a test output
    shutil.copy(shot, keep)
