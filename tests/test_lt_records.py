"""benchmarks/language_transfer_long.py's records (lt_records.py): finished runs, the pilot's checkpoint evaluations and
the base's evaluation kept in benchmarks/records/language_transfer_long/, so the benchmark spans machines that keep no
work folder.

Run on a tiny Llama standing in for SmolLM2 (examples/demo.py's fetch returns it) with tiny sets, the records in a
temporary folder; training, the benchmark's evaluations and the budget merge's search run for real and are counted:
a finished run is recorded and a fresh work folder with its record trains and evaluates nothing and prints the same
tables; --plan says "recorded"; a record made with other settings (steps, the data sets) is neither used nor
overwritten, and a work folder computed with other settings is refused; --no-record and --base never record; a
finished work folder writes its missing record; the pilot's recorded checkpoints are not evaluated again and the main
runs take its length from the record (its final checkpoint forgets); a recorded run whose model a later stage needs
is trained again, its recorded evaluation kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import language_transfer_long  # noqa: E402
import records  # noqa: E402
from lt_util import ITEMS, SETS, corpus, tiny_base, write_data  # noqa: E402

import demo  # noqa: E402  (examples/, on the path once language_transfer_long is imported)

RUN = "full_lr0.0001_s0"  # full fine-tuning at its usual rate: trained, evaluated, budget-merged
ARGS = ["--device", "cpu", "--seeds", "0", "--sweep-seeds", "", "--methods", "full", *SETS, "--batch-size", "4",
        "--max-length", "32", "--eval-batch-size", "8"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    en, de = corpus()
    return {"en": en, "de": de, "base": tiny_base(tmp_path_factory.mktemp("lt_records") / "base", en, de)}


@pytest.fixture
def bench(texts, tmp_path, monkeypatch, capsys):
    """``run(machine, *options)``: the benchmark in the work folder ``machine`` (a new one: the sets only), its output
    JSON and printed text; ``calls``: the trainings (their output folders), evaluations (the models) and budget
    searches done so far; ``folder``: the records."""
    import deltawise.adapt.guarded  # noqa: F401  (binds the real run_train: the guarded rows are counted apart)
    import deltawise.adapt.interpolate
    import deltawise.adapt.train
    import deltawise.eval.runner
    import deltawise.search.budget

    calls = {"train": [], "eval": [], "budget": []}

    def counted(name: str, real, what):
        def call(*args, **kwargs):
            if what(*args) is not None:
                calls[name].append(what(*args))
            return real(*args, **kwargs)

        return call

    def benchmark_evaluation(model, sources=(), *_):  # prose and WordNet, not a search's scoring on the selection sets
        return model if sources and Path(sources[-1]).name == "wordnet_mc.jsonl" else None

    monkeypatch.setattr(deltawise.adapt.train, "run_train",
                        counted("train", deltawise.adapt.train.run_train, lambda cfg, *_: str(cfg.output)))
    monkeypatch.setattr(deltawise.eval.runner, "evaluate", counted("eval", deltawise.eval.runner.evaluate, benchmark_evaluation))
    budget = counted("budget", deltawise.search.budget.run_budget, lambda recipe, out, *_: str(out))
    monkeypatch.setattr(deltawise.search.budget, "run_budget", budget)
    # interpolate (guarded training's search) binds run_budget when first imported, which an earlier test of the
    # same worker may have done: its name is counted too
    monkeypatch.setattr(deltawise.adapt.interpolate, "run_budget", budget)
    monkeypatch.setattr(demo, "fetch_smollm2", lambda console, cache=None: texts["base"])
    monkeypatch.setattr(records, "RECORDS", tmp_path / "records")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what --device cpu sets, undone after the test

    def run(machine: str, *options: str) -> tuple[dict, str]:
        work = tmp_path / machine
        if not (work / "data").is_dir():
            write_data(work / "data", texts["en"], texts["de"])
        capsys.readouterr()
        language_transfer_long.main(["--work", str(work), *ARGS, *options])
        out = work / ("pilot_summary.json" if "--pilot" in options else "language_transfer_long.json")
        printed = capsys.readouterr().out
        return (json.loads(out.read_text()) if out.is_file() and "--plan" not in options else {}), printed

    return run, calls, tmp_path / "records" / "language_transfer_long"


def tables(printed: str) -> list[str]:
    """The printed tables' lines (no timings, paths or messages)."""
    return [line for line in printed.splitlines() if line[:1] in "┃│┏┡└━" and line.strip()]


def counts(calls: dict) -> dict[str, int]:
    return {name: len(made) for name, made in calls.items()}


def test_a_recorded_run_is_neither_trained_nor_evaluated_again(bench):
    run, calls, folder = bench
    first, printed = run("machine-1", "--steps", "2")
    assert counts(calls) == {"train": 1, "eval": 2, "budget": 1}  # the base and the run
    saved = json.loads((folder / f"{RUN}.json").read_text())
    assert set(saved["files"]) == {"eval.json", "budget.json", "seconds.json"}
    assert saved["settings"]["steps"] == 2 and saved["settings"]["budget"] == 0.99
    prose = next(d for d in saved["files"]["eval.json"]["datasets"] if d["name"] == "english_prose")
    assert len(prose["per_item_nll"]) == ITEMS  # what the paired intervals are computed from
    assert "base.json" in json.loads((folder / "base.json").read_text())["files"]
    again, printed_again = run("machine-2", "--steps", "2")  # a new machine: an empty work folder
    assert counts(calls) == {"train": 1, "eval": 2, "budget": 1}
    assert again["runs"] == first["runs"] and tables(printed_again) == tables(printed) and tables(printed)
    assert f"{RUN}: eval.json, budget.json, seconds.json from " in printed_again
    _, plan = run("machine-3", "--steps", "2", "--plan")
    line = next(x for x in plan.splitlines() if RUN in x)
    assert line.count("recorded") == 3, line  # trained (not needed), evaluated, budget merge


def test_a_record_with_other_settings_is_neither_used_nor_overwritten(bench):
    run, calls, folder = bench
    run("machine-1", "--steps", "2")
    record = folder / f"{RUN}.json"
    before = record.read_text()
    _, printed = run("machine-2", "--steps", "3")
    assert counts(calls) == {"train": 2, "eval": 3, "budget": 2} and record.read_text() == before
    assert "other settings (steps 2, here 3); not used, not overwritten" in printed
    saved = json.loads(before)
    saved["settings"]["data"] = "0" * 64  # computed on sets drawn from other Debian/Python files
    records.save_record(record, saved)
    edited = record.read_text()
    _, printed = run("machine-3", "--steps", "2")
    assert counts(calls) == {"train": 3, "eval": 4, "budget": 3} and record.read_text() == edited
    assert "Debian and Python files" in printed and f"{RUN}.json was computed with other settings (data '000" in printed
    with pytest.raises(SystemExit, match="holds results computed with other settings .steps 2, here 3"):
        run("machine-1", "--steps", "3")  # its work folder's run was computed with 2 steps
    _, plan = run("machine-1", "--steps", "3", "--plan")
    line = next(x for x in plan.splitlines() if x.startswith(f"│ {RUN}"))
    assert "done" not in line and "recorded" not in line, line
    assert f"computed with other settings in the work folder (move them away to run them): {RUN}" in " ".join(plan.split())


def test_a_gpu_result_is_recorded_apart_and_a_cpu_record_is_not_a_gpu_result(bench, monkeypatch):
    run, calls, folder = bench
    run("machine-1", "--steps", "2")
    monkeypatch.setattr(language_transfer_long, "resolve_device", lambda name: name)  # --plan on this CPU-only machine
    _, plan = run("machine-2", "--steps", "2", "--plan", "--device", "cuda")
    line = next(x for x in plan.splitlines() if x.startswith(f"│ {RUN}"))
    assert "recorded" not in line, line  # the CPU's record is not the GPU's result
    saved = json.loads((folder / f"{RUN}.json").read_text())
    assert saved["settings"]["device"] == "cpu"
    saved["settings"]["device"] = "cuda"
    records.save_record(folder / "cuda" / f"{RUN}.json", saved)  # as a GPU machine records the run
    _, plan = run("machine-3", "--steps", "2", "--plan", "--device", "cuda:0")
    line = next(x for x in plan.splitlines() if x.startswith(f"│ {RUN}"))
    assert line.count("recorded") == 3, line
    _, plan = run("machine-4", "--steps", "2", "--plan")  # the CPU still reads its own record
    assert next(x for x in plan.splitlines() if x.startswith(f"│ {RUN}")).count("recorded") == 3


def test_without_a_gpu_or_with_recorded_only_nothing_is_computed_and_the_runs_not_recorded_are_named(bench):
    """transformers would train on the CPU where --device cuda is absent: such a result must not be recorded as the
    GPU's; so nothing is computed and the runs not recorded are named. --recorded-only does the same anywhere."""
    run, calls, folder = bench
    with pytest.raises(SystemExit, match="the base's evaluation: not recorded, and cuda is not on this machine"):
        run("machine-0", "--steps", "2", "--device", "cuda")
    assert counts(calls) == {"train": 0, "eval": 0, "budget": 0}
    first, printed = run("machine-1", "--steps", "2")
    for name in ("base", RUN):  # as a GPU machine records them
        saved = json.loads((folder / f"{name}.json").read_text())
        saved["settings"]["device"] = "cuda"
        records.save_record(folder / "cuda" / f"{name}.json", saved)
    shown, printed = run("machine-2", "--steps", "2", "--device", "cuda", "--seeds", "0,1")
    assert counts(calls) == {"train": 1, "eval": 2, "budget": 1}  # machine-1's only
    assert [r["key"] for r in shown["runs"]] == [RUN] and shown["left_out"] == [RUN.replace("_s0", "_s1")]
    assert shown["runs"] == first["runs"]
    assert f"{RUN.replace('_s0', '_s1')}: not recorded, and cuda is not on this machine: left out" in printed
    assert not (folder / "cuda" / f"{RUN.replace('_s0', '_s1')}.json").exists()
    shown, printed = run("machine-3", "--steps", "2", "--seeds", "0,1", "--recorded-only")  # the CPU's, alike
    assert counts(calls) == {"train": 1, "eval": 2, "budget": 1}
    assert shown["runs"] == first["runs"] and shown["left_out"] == [RUN.replace("_s0", "_s1")]
    assert f"{RUN.replace('_s0', '_s1')}: not recorded (--recorded-only): left out" in printed
    with pytest.raises(SystemExit, match=r"the pilot: not recorded \(--recorded-only\); nothing to show"):
        run("machine-4", "--pilot", "--pilot-steps", "2", "--pilot-every", "1", "--recorded-only")
    assert counts(calls) == {"train": 1, "eval": 2, "budget": 1}


def test_no_record_and_another_base_never_record(bench, texts):
    run, calls, folder = bench
    run("machine-1", "--steps", "2", "--no-record")
    run("machine-2", "--steps", "2", "--base", str(texts["base"]))
    assert counts(calls) == {"train": 2, "eval": 4, "budget": 2} and not folder.exists()
    run("machine-3", "--steps", "2")
    run("machine-4", "--steps", "2", "--no-record")  # the record is not read either
    assert counts(calls) == {"train": 4, "eval": 8, "budget": 4}


def test_a_finished_work_folder_writes_its_missing_record(bench):
    run, calls, folder = bench
    run("machine-1", "--steps", "2")
    saved = {path.name: path.read_text() for path in folder.iterdir()}
    for path in folder.iterdir():
        path.unlink()
    run("machine-1", "--steps", "2")  # everything cached in the work folder: nothing computed, the records written
    assert counts(calls) == {"train": 1, "eval": 2, "budget": 1}
    assert {path.name: path.read_text() for path in folder.iterdir()} == saved


def test_a_recorded_evaluation_is_kept_when_the_run_is_trained_again_for_its_budget_merge(bench):
    run, calls, folder = bench
    first, _ = run("machine-1", "--steps", "2")
    record = folder / f"{RUN}.json"
    saved = json.loads(record.read_text())
    del saved["files"]["budget.json"]  # a record written before the budget merge finished
    records.save_record(record, saved)
    again, _ = run("machine-2", "--steps", "2")
    assert counts(calls) == {"train": 2, "eval": 2, "budget": 2}  # trained again for the merge, not evaluated
    assert calls["train"][-1].startswith(str(folder.parents[1] / "machine-2"))
    seconds, seconds_before = again["runs"][0]["seconds"], first["runs"][0]["seconds"]
    assert seconds["train"] == seconds_before["train"] and seconds["eval"] == seconds_before["eval"]  # the evaluated run's
    assert seconds["budget"] != seconds_before["budget"]  # the merge done now
    assert set(json.loads(record.read_text())["files"]) == {"eval.json", "budget.json", "seconds.json"}


def test_the_pilot_reuses_recorded_checkpoint_evaluations_and_the_runs_take_its_steps(bench):
    run, calls, folder = bench
    pilot_args = ("--pilot", "--pilot-steps", "4", "--pilot-every", "2")
    first, _ = run("machine-1", *pilot_args)
    assert counts(calls) == {"train": 1, "eval": 3, "budget": 0}  # the base and two checkpoints
    record = folder / "pilot.json"
    saved = json.loads(record.read_text())
    assert set(saved["files"]) == {"results/step-00002.json", "results/step-00004.json", "pilot.json"}
    saved["files"] = {"results/step-00002.json": saved["files"]["results/step-00002.json"]}  # stopped after step 2
    records.save_record(record, saved)
    again, _ = run("machine-2", *pilot_args)
    assert counts(calls) == {"train": 2, "eval": 4, "budget": 0}  # trained again, only step 4 evaluated
    assert [p["step"] for p in again["pilot"]["curve"]] == [2, 4]
    assert again["pilot"]["curve"][0] == first["pilot"]["curve"][0]
    saved = json.loads(record.read_text())
    assert set(saved["files"]) == {"results/step-00002.json", "results/step-00004.json", "pilot.json"}
    final = saved["files"]["pilot.json"]["curve"][-1]
    final["prose_retention_ci"] = [0.5, 0.9]  # whatever the pilot found: its final checkpoint forgets
    records.save_record(record, saved)
    _, plan = run("machine-3", "--plan")
    assert "pilot: recorded: its final checkpoint (4 steps) forgets English prose" in plan
    runs, _ = run("machine-4", "--seeds", "1")  # no --steps, no pilot here; the pilot's options need not be given
    assert counts(calls) == {"train": 3, "eval": 5, "budget": 1}  # the run alone: the base's evaluation is recorded
    assert calls["train"][-1].endswith("/runs/full_lr0.0001_s1/train") and runs["runs"][0]["steps"] == 4
    assert not (folder.parents[1] / "machine-4" / "pilot").exists()


def test_forgetting_budget_rows_are_recorded_and_a_repair_of_a_recorded_run_trains_it_again(bench, monkeypatch):
    import deltawise.adapt.guarded

    run, calls, folder = bench
    guarded = []
    real = deltawise.adapt.guarded.guarded_train
    monkeypatch.setattr(deltawise.adapt.guarded, "guarded_train", lambda cfg, *a, **k: guarded.append(cfg) or real(cfg, *a, **k))
    rows = ("--steps", "2", "--methods", "full-repair,full-guard", "--seeds", "0", "--sweep-seeds", "0")
    first, _ = run("machine-1", *rows)
    # full at 3e-4 trained and evaluated, repaired and evaluated; guarded runs at 1e-4 and 3e-4 (each with its
    # --interpolate search), evaluated; the base
    assert counts(calls) == {"train": 1, "eval": 5, "budget": 2} and len(guarded) == 2
    assert set(json.loads((folder / "full-repair_lr0.0003_s0.json").read_text())["files"]) == {
        "eval.json", "seconds.json", "repair.json"}
    assert set(json.loads((folder / "full-guard_lr0.0001_s0.json").read_text())["files"]) == {
        "eval.json", "seconds.json", "train/deltawise_guard.json"}
    again, _ = run("machine-2", *rows)
    assert counts(calls) == {"train": 1, "eval": 5, "budget": 2} and len(guarded) == 2
    assert again["forgetting_budget"] == first["forgetting_budget"]
    (folder / "full-repair_lr0.0003_s0.json").unlink()
    run("machine-3", *rows)
    # the run repaired is trained again, not evaluated; the guarded rows come from their records
    assert counts(calls) == {"train": 2, "eval": 6, "budget": 2} and len(guarded) == 2


def test_a_negative_checkpoint_count_is_refused(bench, capsys):
    run, calls, _ = bench
    with pytest.raises(SystemExit):
        run("machine-1", "--steps", "2", "--checkpoints", "-1")
    assert "--checkpoints -1: give 0 (none) or more" in capsys.readouterr().err and not calls["train"]
