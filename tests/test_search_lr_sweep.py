"""``deltawise lr-sweep``: short runs over a learning-rate grid on a constructed trade-off (a base that
knows the source text, training on a target text: a larger rate gains more and forgets more). The
recommendation is the largest gain whose retention lower bound clears the budget on the selection
split, and it honours the budget on the held-out split; runs are cached, so a rerun trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adapt_util import tiny_lm  # noqa: F401
from search_util import hand_splits, one_thread, source_base, versus_base, write_texts  # noqa: F401
from typer.testing import CliRunner

from deltawise.cli import app
from deltawise.errors import InputError, OutputError
from deltawise.eval.runner import EvalOptions
from deltawise.options import ExecutorOptions
from deltawise.search.budget import RetentionBudget
from deltawise.search.lr_sweep import SweepOptions, run_lr_sweep

LRS = (1e-4, 1e-3, 3e-2)


@pytest.fixture(scope="module")
def tradeoff(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    files = write_texts(root)
    source_base(tiny_lm, files, root / "base")
    return {**files, "train": files["tgt_txt"], "base": root / "base", "root": root}


def _options(tradeoff, budget: float, **kw) -> SweepOptions:
    kw = {"lrs": LRS, "steps": 2, "method": "full", "training": {"batch_size": 8}, **kw}
    return SweepOptions([RetentionBudget(tradeoff["src"], budget)], [tradeoff["tgt"]], **kw)


BUDGET = 0.9


@pytest.fixture(scope="module")
def swept(tradeoff):
    """One sweep into a module-wide folder; later tests reuse its cached runs."""
    notes: list[str] = []
    result = run_lr_sweep(str(tradeoff["base"]), tradeoff["train"], tradeoff["root"] / "sweep",
                          _options(tradeoff, BUDGET, note=notes.append))
    return {"result": result, "notes": notes, "out": tradeoff["root"] / "sweep"}


def test_the_recommendation_is_the_largest_gain_within_budget_and_honours_it_on_held_out_items(tradeoff, swept, tmp_path):
    result = swept["result"]
    files = hand_splits(tradeoff, tmp_path / "split")
    assert [p.lr for p in result.points] == list(LRS)
    for p in result.points:
        # scored on the selection split exactly as a hand evaluation of the trained run; reported on the held-out one
        sel = versus_base(tradeoff["base"], p.folder, files, 0, EvalOptions(base=str(tradeoff["base"])))
        held = versus_base(tradeoff["base"], p.folder, files, 1, EvalOptions(base=str(tradeoff["base"])))
        assert p.selection["retention"]["src"] == pytest.approx(sel["src"].ratio, rel=1e-6)
        assert p.selection["retention_lower"]["src"] == pytest.approx(sel["src"].ratio_lower, rel=1e-6)
        assert p.selection["target"]["tgt"] == pytest.approx(sel["tgt"].ratio, rel=1e-6)
        assert p.heldout["retention"]["src"] == pytest.approx(held["src"].ratio, rel=1e-6)
        assert p.heldout["target_ci"]["tgt"] == pytest.approx(list(held["tgt"].ratio_ci), rel=1e-6)
        assert p.feasible == (sel["src"].ratio_lower >= BUDGET)
        assert json.loads((p.folder / "deltawise_train.json").read_text())["steps"] == 2
    # the constructed trade-off: a larger rate forgets more; the largest rate gains most but breaks the budget
    retention = [p.selection["retention"]["src"] for p in result.points]
    assert retention[0] > retention[1] > retention[2]
    best_overall = max(range(len(LRS)), key=lambda i: result.points[i].target_score)
    assert not result.points[best_overall].feasible
    feasible = [i for i, p in enumerate(result.points) if p.feasible]
    assert result.recommended == max(feasible, key=lambda i: result.points[i].target_score) == 1
    rec = result.points[result.recommended]
    assert rec.heldout["retention"]["src"] >= BUDGET  # the budget holds on items the choice never saw
    found = json.loads((swept["out"] / "sweep.json").read_text())
    assert found["recommended_lr"] == LRS[1] and found["recommended"]["within_budget"] is True
    assert (swept["out"] / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("src", "tgt"):
        ids = [{json.loads(line)["id"] for line in f.read_text().splitlines()} for f in files[name]]
        assert ids[0] and ids[1] and not ids[0] & ids[1]


def test_a_rerun_reuses_every_finished_run_and_a_changed_setting_does_not(tradeoff, swept):
    stamps = {p.lr: (p.folder / "deltawise_train.json").stat().st_mtime_ns for p in swept["result"].points}
    notes: list[str] = []
    again = run_lr_sweep(str(tradeoff["base"]), tradeoff["train"], swept["out"], _options(tradeoff, BUDGET, note=notes.append))
    assert any("reusing 3 finished run(s)" in n for n in notes) and not any(n.startswith("training") for n in notes)
    assert {p.lr: (p.folder / "deltawise_train.json").stat().st_mtime_ns for p in again.points} == stamps
    assert [p.selection for p in again.points] == [p.selection for p in swept["result"].points]
    # the CLI with the same settings (its defaults filled in) hits the same cache
    res = CliRunner().invoke(app, ["lr-sweep", str(tradeoff["base"]), "--data", str(tradeoff["train"]), "-m", "full",
                                   "--lrs", ",".join(map(str, LRS)), "--steps", "2", "--retain", f"{tradeoff['src']}:{BUDGET}",
                                   "--target", str(tradeoff["tgt"]), "-o", str(swept["out"])], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "reusing 3 finished run(s)" in res.output and "recommended: lr 0.001" in res.output
    assert "held out: retention src" in res.output and "meets the budget" in res.output
    # one more step is another run
    notes.clear()
    other = run_lr_sweep(str(tradeoff["base"]), tradeoff["train"], swept["out"],
                         _options(tradeoff, BUDGET, lrs=(1e-4,), steps=3, note=notes.append))
    assert other.points[0].folder not in {p.folder for p in swept["result"].points}
    assert any(n.startswith("training lr 0.0001") for n in notes)


@pytest.mark.slow  # two spawned processes each import torch and transformers: about a minute on two busy cores
def test_parallel_runs_give_the_serial_results(tradeoff, swept, tmp_path):
    parallel = run_lr_sweep(str(tradeoff["base"]), tradeoff["train"], tmp_path / "par",
                            _options(tradeoff, BUDGET, lrs=LRS[:2], executor=ExecutorOptions(jobs=2)))
    for a, b in zip(parallel.points, swept["result"].points[:2]):
        assert a.selection["retention"]["src"] == pytest.approx(b.selection["retention"]["src"], rel=1e-5)
        assert a.selection["target"]["tgt"] == pytest.approx(b.selection["target"]["tgt"], rel=1e-5)


def test_bad_inputs_are_refused_with_clear_errors(tradeoff, swept, tmp_path):
    base, train = str(tradeoff["base"]), tradeoff["train"]
    cases = [(SweepOptions([], [tradeoff["tgt"]], lrs=(1e-3,), steps=1), "--retain"),
             (SweepOptions([RetentionBudget(tradeoff["src"], 0.9)], [], lrs=(1e-3,), steps=1), "--target"),
             (_options(tradeoff, 0.9, lrs=(1e-3, -1.0)), "positive learning rates"),
             (_options(tradeoff, 0.9, lrs=(1e-3, 1e-3)), "names a rate twice"),
             (_options(tradeoff, 0.9, steps=0), "--steps"),
             (_options(tradeoff, 0.9, executor=ExecutorOptions(jobs=0)), "--jobs")]
    for opts, message in cases:
        with pytest.raises(InputError, match=message):
            run_lr_sweep(base, train, tmp_path / "o", opts)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an lr-sweep folder"):
        run_lr_sweep(base, train, tmp_path / "busy", _options(tradeoff, 0.9))
    with pytest.raises(OutputError):
        run_lr_sweep(base, train, tradeoff["base"] / "sweep", _options(tradeoff, 0.9))
    assert not (tmp_path / "o").exists()
    args = ["lr-sweep", base, "--data", str(train), "-m", "full", "--steps", "2", "--target", str(tradeoff["tgt"]),
            "-o", str(swept["out"])]
    res = CliRunner().invoke(app, [*args, "--lrs", "a,b", "--retain", f"{tradeoff['src']}:0.9"])
    assert res.exit_code != 0 and "comma-separated numbers" in str(res.exception)
    # no rate within an impossible budget (the cached runs are scored again): an error, nothing recommended
    res = CliRunner().invoke(app, [*args, "--lrs", ",".join(map(str, LRS)), "--retain", f"{tradeoff['src']}:1.5"])
    assert res.exit_code != 0 and "no rate keeps every retention" in str(res.exception)
    assert json.loads((swept["out"] / "sweep.json").read_text())["recommended_lr"] is None
