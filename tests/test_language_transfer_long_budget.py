"""benchmarks/language_transfer_long.py's forgetting-budget rows (lt_budget.py: guarded training, repair, the
learning-rate search) run end to end on a tiny Llama and tiny sets: every row with its intervals and cost, the
tools choosing on the selection sets only, --plan listing them, and a rerun computing nothing."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import language_transfer_long  # noqa: E402
from lt_util import SETS, corpus, tiny_base, write_data  # noqa: E402

ROWS = ("full-guard_lr0.0001_s0", "full-guard_lr0.0003_s0", "full-repair_lr0.0003_s0", "full-lr-sweep_s0")
ARGS = ["--device", "cpu", "--steps", "4", "--seeds", "0", "--sweep-seeds", "0",
        "--methods", "full,lora,full-guard,full-repair,full-lr-sweep", *SETS, "--batch-size", "4", "--max-length", "32",
        "--eval-batch-size", "8", "--lr-sweep-steps", "2", "--lr-sweep-examples", "16"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny base and a work folder holding the benchmark's sets; ``fresh()`` makes another such work folder. The
    runs are of another base (``--base``): nothing is recorded."""
    root = tmp_path_factory.mktemp("lt_budget")
    en, de = corpus()
    base = tiny_base(root / "base", en, de)

    def fresh(name: str) -> Path:
        write_data(root / name / "data", en, de)
        return root / name

    return {"base": base, "work": fresh("work"), "data": root / "work" / "data", "fresh": fresh}


def _run(bench, monkeypatch, *extra: str, work: Path | None = None) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what --device cpu sets, undone after the test
    language_transfer_long.main(["--work", str(work or bench["work"]), "--base", str(bench["base"]), *ARGS, *extra])


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_budget_rows_choose_on_selection_sets_report_intervals_and_cost_and_are_cached(bench, monkeypatch, capsys):
    work, data = bench["work"], bench["data"]
    _run(bench, monkeypatch)
    printed = capsys.readouterr().out
    payload = json.loads((work / "language_transfer_long.json").read_text())
    rows = {(r["label"], r["lr"]): r for r in payload["forgetting_budget"]}
    assert {label for label, _ in rows} == {"full", "lora", "full-guard", "full-repair", "full-lr-sweep"}
    assert ("full-guard", 1e-4) in rows and ("full-guard", 3e-4) in rows and ("full-repair", 3e-4) in rows
    sweep_record = json.loads((work / "runs" / "full-lr-sweep_s0" / "sweep.json").read_text())
    taken = sweep_record["row_lr"]
    assert taken in (3e-5, 1e-4, 3e-4) and ("full-lr-sweep", taken) in rows
    assert f"lr {taken:g}" in rows[("full-lr-sweep", taken)]["choices"][0]  # the table states the rate it took
    expected_parts = {"full-guard": {"train", "monitor", "interpolate"}, "full-repair": {"train", "search"},
                      "full-lr-sweep": {"search", "train"}, "full": {"train"}, "lora": {"train"}}
    for (label, _), row in rows.items():
        for key in ("target_gain", "prose_retention", "wordnet_ratio"):
            low, high = row[key + "_ci"]
            assert low <= row[key]["mean"] <= high
        assert set(row["cost"]["parts"]) == expected_parts[label]
        assert all(v is not None and v > 0 for v in row["cost"]["parts"].values()) and row["cost"]["total"] > 0
        if label.startswith("full-"):
            assert set(row["at_matched_gain"]) == {"full", "lora"} and row["choices"]
    # cost = its parts where the parts are the whole: repair and the sweep build on full's timed training run
    full_train = {r["key"]: r["seconds"]["train"] for r in payload["runs"] if r["label"] == "full"}
    repair = rows[("full-repair", 3e-4)]["cost"]
    assert repair["parts"]["train"] == pytest.approx(full_train["full_lr0.0003_s0"])
    assert repair["total"] == pytest.approx(sum(repair["parts"].values()))
    guard = rows[("full-guard", 3e-4)]["cost"]
    assert guard["total"] > guard["parts"]["train"] + guard["parts"]["monitor"]  # the whole run, its checks included
    for name in ("full-guard", "full-repair", "full-lr-sweep"):
        assert name in printed
    # selection: each tool was given the selection sets (which it cut again), never an evaluation set
    selection = [str(data / "select" / "english_prose.jsonl"), str(data / "select" / "german.jsonl")]
    records = [work / "runs" / key / "train" / "deltawise_guard.json" for key in ROWS[:2]]
    records += [work / "runs" / ROWS[2] / "repair.json", work / "runs" / ROWS[3] / "sweep.json"]
    for record in records:
        found = json.loads(record.read_text())
        assert [s["file"] for s in found["splits"]] == selection
        assert all(s["heldout_file"] is None for s in found["splits"])  # the held-out halves are cut from them too
        assert str(data / "eval") not in record.read_text()
    guard_record = json.loads(records[0].read_text())
    assert guard_record["budgets"] == {"english_prose": 0.98} and guard_record["interpolation"]
    # the row says both whether a checked step met the budget and whether the written point is within it
    tools = {r["key"]: r["tool"] for r in payload["runs"] if r["label"] == "full-guard"}
    for key, record in zip(ROWS[:2], records[:2]):
        found = json.loads(record.read_text())
        assert tools[key]["budget_met_on_monitor"] == found["budget_met"]
        assert tools[key]["written_within_budget_on_monitor"] == found["chosen"]["within_budget"]
    # --plan lists the new rows as done
    language_transfer_long.main(["--work", str(work), "--base", str(bench["base"]), *ARGS, "--plan"])
    plan = capsys.readouterr().out
    for key in ROWS:
        line = next(x for x in plan.splitlines() if key in x)
        assert line.count("done") == 2, line
    # a rerun computes nothing: no training, scoring or search is called, and no file changes
    before = _files(work / "runs")

    def computed(*_a, **_k):
        raise AssertionError("a cached stage was computed again")

    for module, name in (("deltawise.adapt.train", "run_train"), ("deltawise.adapt.guarded", "guarded_train"),
                         ("deltawise.eval.runner", "evaluate"), ("deltawise.search.repair", "run_repair"),
                         ("deltawise.search.lr_sweep", "run_lr_sweep"), ("deltawise.search.budget", "run_budget")):
        monkeypatch.setattr(f"{module}.{name}", computed)
    _run(bench, monkeypatch)
    assert _files(work / "runs") == before
    again = json.loads((work / "language_transfer_long.json").read_text())
    assert again["forgetting_budget"] == payload["forgetting_budget"]


@pytest.mark.slow
def test_with_no_rate_within_the_budget_the_sweep_row_takes_the_most_retentive_and_another_budget_is_refused(
        bench, monkeypatch, capsys):
    work = bench["fresh"]("unmeetable")
    # no model keeps 1.5 of the base's English: no rate is recommended
    _run(bench, monkeypatch, "--methods", "full-lr-sweep", "--retain-budget", "1.5", work=work)
    record = json.loads((work / "runs" / "full-lr-sweep_s0" / "sweep.json").read_text())
    assert record["recommended_lr"] is None
    lower = {r["lr"]: r["selection"]["retention_lower"]["english_prose"] for r in record["runs"]}
    assert record["row_lr"] == max(lower, key=lower.get)
    row = json.loads((work / "language_transfer_long.json").read_text())["forgetting_budget"][0]
    assert row["lr"] == record["row_lr"] and "none within the budget" in row["choices"][0]
    assert (work / "runs" / f"full_lr{record['row_lr']:g}_s0" / "eval.json").is_file()  # full's run at that rate
    capsys.readouterr()
    with pytest.raises(SystemExit, match="computed with other settings .*retain_budget 1.5, here 0.98"):
        _run(bench, monkeypatch, "--methods", "full-lr-sweep", work=work)  # the default 0.98: not what is cached


def test_a_guard_row_interrupted_in_its_searches_is_not_done():
    """A guarded run killed in its --interpolate searches leaves the kept checkpoint and a record marked not finished:
    --plan counts its stage as to do (the rerun resumes the searches, lt_methods.train_config), not as done."""
    import lt_budget
    import lt_methods

    from deltawise.adapt.guarded import SEARCHES_PENDING

    run = lt_methods.Run(lt_methods.select("full-guard")[0], 3e-4, 0)
    files = {lt_budget.TOOL_RECORDS["guard"]: {"interpolation": SEARCHES_PENDING}}
    assert lt_budget.status(run, lambda _run, name: files.get(name)) == (False, False)
    files[lt_budget.TOOL_RECORDS["guard"]] = {"interpolation": {"wise-ft": {}}}
    files["eval.json"] = {}
    assert lt_budget.status(run, lambda _run, name: files.get(name)) == (True, True)


def test_the_refined_guard_row_passes_its_rounds_and_leaves_the_other_rows_settings_alone(tmp_path, monkeypatch):
    """full-guard-refine asks the guard for --interpolate-refine 2; the rows without refinement keep the settings
    their records were made with (no ``refine`` among them), so those records still apply."""
    from types import SimpleNamespace

    import lt_budget
    import lt_methods
    import lt_records

    import deltawise.adapt.guarded as guarded

    seen = []

    def stop(cfg, request, **kwargs):
        seen.append(request.options)
        raise RuntimeError("stop")

    monkeypatch.setattr(guarded, "guarded_train", stop)
    args = SimpleNamespace(steps=4, batch_size=4, max_length=32, retain_budget=0.98, eval_batch_size=8, device="cpu",
                           recorded_only=False, checkpoints=0)
    refine = lt_methods.Run(lt_methods.select("full-guard-refine")[0], 3e-4, 0)
    plain = lt_methods.Run(lt_methods.select("full-guard")[0], 3e-4, 0)
    assert lt_records.run_settings(refine, args)["method"]["refine"] == 2
    assert "refine" not in lt_records.run_settings(plain, args)["method"]
    bench = lt_budget.Bench(tmp_path / "base", lt_methods.Data(tmp_path / "data"), None, args, None, None)
    for run, rounds in ((refine, 2), (plain, 0)):
        with pytest.raises(RuntimeError, match="stop"):
            (tmp_path / run.key).mkdir()
            lt_budget.guarded(run, bench, tmp_path / run.key, {})
        assert seen[-1].interpolate and seen[-1].interpolate_refine == rounds
