"""``bam --executor local|ray``: a round's branches as jobs of an executor (adapt/executors.py) give the same
merged model as training them one after another in this process, and a run whose branch job was killed
continues on rerun, retraining only that branch.

The Ray tests start a local instance with 2 CPUs (``ray.init(num_cpus=2)``) and skip when Ray is not
installed (the ``deltawise[ray]`` extra). Marked slow: worker processes import torch and transformers.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from adapt_util import tiny_lm, write_numbered_docs  # noqa: F401
from executor_jobs import square_or_fail
from typer.testing import CliRunner

from conftest import load_state
from deltawise.adapt.executors import InlineExecutor, JobsFailed, LocalExecutor, make_executor
from deltawise.cli import app
from deltawise.errors import InputError, OutputError


def bam_args(tiny_lm, data: Path, out: Path, *extra: str) -> list[str]:
    return ["bam", str(tiny_lm["model"]), "--data", str(data), "-o", str(out), "-k", "2", "--rounds", "1", "--merge", "linear",
            "--method", "full", "--max-steps", "1", "--batch-size", "2", "--lr", "1e-2", "--warmup", "0", "--max-length", "32",
            "--quiet", *extra]


def bam(tiny_lm, data: Path, out: Path, *extra: str) -> None:
    res = CliRunner().invoke(app, bam_args(tiny_lm, data, out, *extra))
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"


def assert_same_model(ours: Path, reference: Path) -> None:
    a, b = load_state(ours), load_state(reference)
    assert a.keys() == b.keys()
    for k in b:
        # the branches trained with another torch thread count: equal up to float rounding
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def data(tiny_lm) -> Path:
    return write_numbered_docs(tiny_lm["root"] / "exec_data.txt")


@pytest.fixture(scope="module")
def sequential(tiny_lm, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sequential") / "out"
    bam(tiny_lm, data, out)
    return out


def test_inline_and_local_executors_return_results_in_order_and_report_failures_together():
    done = []
    assert InlineExecutor().run(square_or_fail, [3, 1, 2], on_done=lambda i, r: done.append((i, r))) == [9, 1, 4]
    assert done == [(0, 9), (1, 1), (2, 4)]
    with pytest.raises(ValueError, match="negative input -1"):  # inline: the job's own error, at once
        InlineExecutor().run(square_or_fail, [2, -1, 3])
    done.clear()
    with pytest.raises(JobsFailed, match="job 2: ValueError: negative input -1") as failed:
        LocalExecutor(2).run(square_or_fail, [2, -1, 3], on_done=lambda i, r: done.append((i, r)))
    assert failed.value.failures.keys() == {1} and sorted(done) == [(0, 4), (2, 9)]  # the others still finished


def test_ray_executor_is_refused_clearly_without_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(InputError, match=r"deltawise\[ray\]"):
        make_executor("ray")
    with pytest.raises(InputError, match="unknown executor"):
        make_executor("slurm")


@pytest.mark.slow
def test_local_executor_bam_equals_the_sequential_run(tiny_lm, data, sequential, tmp_path):
    bam(tiny_lm, data, tmp_path / "out", "--executor", "local", "--jobs", "2")
    assert_same_model(tmp_path / "out", sequential)
    log = json.loads((tmp_path / "out" / "bam.json").read_text())
    assert [b["branch"] for b in log["rounds_log"][0]["branches"]] == [1, 2]


@pytest.mark.slow
def test_ray_executor_bam_equals_the_sequential_run(local_ray, tiny_lm, data, sequential, tmp_path):
    bam(tiny_lm, data, tmp_path / "out", "--executor", "ray", "--branch-cpus", "1")
    assert_same_model(tmp_path / "out", sequential)


def _kill_first_branch_task(stop: threading.Event) -> int | None:
    """SIGKILL the first Ray worker seen running a branch (Ray titles a busy worker ``ray::FUNCTION``).

    Only this process's own Ray instance is searched (its raylet and workers descend from it): under
    pytest-xdist another worker may run a Ray branch of its own test at the same time."""
    while not stop.is_set():
        for proc in psutil.Process().children(recursive=True):
            try:
                cmdline = proc.cmdline()
            except psutil.Error:  # ended between listing and reading
                continue
            if any("ray::train_branch_job" in part for part in cmdline):
                proc.send_signal(signal.SIGKILL)
                return proc.pid
        time.sleep(0.05)
    return None


@pytest.mark.slow
def test_ray_bam_resumes_after_a_branch_job_is_killed(local_ray, tiny_lm, data, sequential, tmp_path):
    from deltawise.adapt.bam import BamConfig, run_bam
    from deltawise.adapt.train import TrainConfig

    out = tmp_path / "out"
    work = tmp_path / "out.work" / "round_1"
    train = TrainConfig(model=tiny_lm["model"], data=data, output=out, method="full", max_steps=1, batch_size=2, lr=1e-2,
                        warmup=0, max_length=32, schedule="cpt", progress=False)
    cfg = BamConfig(train=train, branches=2, rounds=1, merge="linear", executor="ray", branch_cpus=1)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=lambda: killed.append(_kill_first_branch_task(stop)))
    killer.start()
    try:
        with pytest.raises(OutputError, match=r"round 1: branch\(es\) \d failed .*rerun the same command"):
            run_bam(cfg)
    finally:
        stop.set()
        killer.join()
    assert killed[0] is not None
    finished = [(work / f"branch_{k}" / "done.json").is_file() for k in (1, 2)]
    assert sorted(finished) == [False, True] and not out.exists()

    result = run_bam(cfg)  # the rerun trains only the killed branch
    skipped = [b["skipped"] for b in result.log["rounds_log"][0]["branches"]]
    assert skipped == finished
    assert_same_model(out, sequential)
