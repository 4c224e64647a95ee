"""benchmarks/lt_workers.py: the long language-transfer benchmark's runs in parallel processes sharing one work
folder. The job order (whole seeds first, sweeps without the main runs, the forgetting-budget rows last), and real
runs on a tiny Llama: two workers train and evaluate two methods into one folder, each job's log kept; a stop kills
the running job and names the ones not started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lt_workers  # noqa: E402
import lt_methods  # noqa: E402
from lt_util import SETS, corpus, tiny_base, write_data  # noqa: E402


def test_jobs_run_whole_seeds_first_then_the_sweeps_then_the_budget_rows():
    queue = lt_workers.jobs(["full", "english-only", "full-guard", "lora"], [0, 1], [0])
    assert [(j.method, j.seeds, j.sweep_seeds) for j in queue] == [
        ("full", "0", ""), ("english-only", "0", ""), ("lora", "0", ""),
        ("full", "1", ""), ("english-only", "1", ""), ("lora", "1", ""),
        ("full", "", "0"), ("lora", "", "0"),  # english-only has one rate: no sweep
        ("full-guard", "0", ""), ("full-guard", "1", "")]
    assert queue[6].options() == ["--methods", "full", "--seeds", "", "--sweep-seeds", "0"]
    assert len({j.name for j in queue}) == len(queue)  # one log file per job
    assert lt_workers.jobs(["full"], [0], []) == [lt_workers.Job("full", "0", "")]


def test_a_rate_filter_keeps_the_runs_at_those_rates_only():
    lift, full, search = lt_methods.select("lift,full,full-lr-sweep")
    assert [r.key for r in lt_methods.plan([lift], [1], [0], [5e-4])] == ["lift_lr0.0005_s0"]
    assert [r.key for r in lt_methods.plan([lift, full], [1], [], [2e-4, 0.0001])] == ["lift_lr0.0002_s1", "full_lr0.0001_s1"]
    assert [r.key for r in lt_methods.plan([full, search], [0], [], [1e-4])] == ["full_lr0.0001_s0"]  # the search picks its own
    assert len(lt_methods.plan([lift, search], [0], [0])) == 4  # no filter: every rate, and the search
    with pytest.raises(SystemExit, match=r"--lrs 0.003: not a rate of lift \(their rates: 5e-05, 0.0002, 0.0005\)"):
        lt_methods.plan([lift], [0], [0], [3e-3, 5e-4])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lt_workers")
    en, de = corpus()
    return root, tiny_base(root / "base", en, de), (en, de)


def run_workers(setup, name: str, *options: str) -> tuple[Path, int]:
    """lt_workers in a new work folder ``name`` (the tiny sets written), the tiny base's options after ``--``."""
    root, base, (en, de) = setup
    work = root / name
    write_data(work / "data", en, de)
    bench = ["--base", str(base), "--steps", "2", *SETS, "--batch-size", "4", "--max-length", "32", "--eval-batch-size",
             "8", "--device", "cpu", "--checkpoints", "0"]
    return work, lt_workers.main(["--work", str(work), *options, "--", *bench])


def test_two_workers_run_two_methods_into_one_work_folder(setup, capsys):
    work, code = run_workers(setup, "work-both", "--workers", "2", "--methods", "full,lora", "--seeds", "0",
                             "--sweep-seeds", "")
    printed = capsys.readouterr().out
    assert code == 0, printed
    for run in ("full_lr0.0001_s0", "lora_lr0.002_s0"):
        assert (work / "runs" / run / "eval.json").is_file() and (work / "runs" / run / "budget.json").is_file()
    assert sorted(p.name for p in (work / "logs").iterdir()) == ["full_s0_sweep-.log", "lora_s0_sweep-.log"]
    assert "2 jobs finished, 0 failed or stopped" in printed


def test_a_stop_kills_the_running_job_and_names_those_not_started(setup, capsys):
    work, code = run_workers(setup, "work-stop", "--workers", "1", "--stop-after", "1", "--methods", "full",
                             "--seeds", "0,1", "--sweep-seeds", "")
    printed = capsys.readouterr().out
    assert code == 1
    assert "full_s0_sweep-: exit -9" in printed  # killed: a process takes longer than 1 s to import torch
    assert "not started: full_s1_sweep-" in printed
    assert not (work / "runs" / "full_lr0.0001_s1").exists()


def test_options_the_script_sets_are_refused_after_the_separator(capsys):
    with pytest.raises(SystemExit):
        lt_workers.main(["--", "--methods", "full"])
    assert "--methods is this script's to set" in capsys.readouterr().err
    for bad, message in ((["--workers", "0"], "--workers must be at least 1"),
                         (["--stop-after", "-5"], "--stop-after -5.0: give a positive number"),
                         (["--stop-after", "nan"], "--stop-after nan: give a positive number")):
        with pytest.raises(SystemExit):
            lt_workers.main(bad)
        assert message in capsys.readouterr().err


def test_a_sweep_job_trains_the_other_rates_only(setup, capsys):
    work, code = run_workers(setup, "work-sweep", "--workers", "2", "--methods", "english-only,full", "--seeds", "",
                             "--sweep-seeds", "0")
    assert code == 0, capsys.readouterr().out
    others = sorted(lt_methods.Run(lt_methods.FULL, lr, 0).key for lr in lt_methods.FULL.lrs if lr != lt_methods.FULL.usual)
    assert len(others) == 4 and sorted(p.name for p in (work / "runs").iterdir()) == others
    assert all((work / "runs" / run / "eval.json").is_file() for run in others)
