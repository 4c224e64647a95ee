"""A BaM branch on several processes: ``bam --executor ray --branch-workers 2`` (each branch a Ray Train TorchTrainer of
2 gloo workers, adapt/ray_train.py) and ``torchrun --nproc_per_node 2 ... bam --branch-index K`` (the alternative
without Ray) both train each branch as ``run_train`` does under 2 DDP processes (tests/ddp_worker.py, one torchrun
launch over the branches' slices), and merge those branches into the same model: the linear average, by hand.

The Ray test starts a local instance with 2 CPUs (``ray.init(num_cpus=2)``, one worker per CPU, so the two branches
take turns) and skips without Ray Train; Ray Train's start costs about a minute a branch on 2 loaded cores, hence
``slow``. The refusals need neither Ray nor a second process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from adapt_util import tiny_lm, write_numbered_docs  # noqa: F401
from ddp_worker import _free_port, launch_two_ranks
from typer.testing import CliRunner

from conftest import load_state
from deltawise.adapt.bam import BamConfig, fingerprint, run_bam, split_slices
from deltawise.adapt.data import read_examples
from deltawise.adapt.executors import executor_for
from deltawise.adapt.train import TrainConfig
from deltawise.cli import app
from deltawise.errors import InputError
from deltawise.io.output import staging_folder
from deltawise.options import ExecutorOptions

STEPS, BATCH, SEED = 2, 2, 0  # 4 examples a branch: one global batch of 2 x 2 a step under 2 processes
TRAIN = {"max_steps": STEPS, "batch_size": BATCH, "lr": 1e-2, "warmup": 0, "max_length": 32, "schedule": "cpt"}


def bam_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["bam", str(model), "--data", str(data), "-o", str(out), "-k", "2", "--rounds", "1", "--merge", "linear",
            "--method", "full", "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "1e-2", "--warmup", "0",
            "--schedule", "cpt", "--max-length", "32", "--seed", str(SEED), "--quiet", *extra]


@pytest.fixture(scope="module")
def data(tiny_lm) -> Path:
    return write_numbered_docs(tiny_lm["root"] / "ray_train_data.txt")


@pytest.fixture(scope="module")
def ddp_branches(tiny_lm, data, tmp_path_factory) -> dict[int, dict]:
    """Branch k of the round trained by ``run_train`` under torchrun with 2 gloo processes on its slice (BaM's seeded
    split, seed + k - 1): {k: {"model": state dict rank 0 wrote, "log": its training log}}."""
    root = tmp_path_factory.mktemp("ddp_branches")
    examples = read_examples(data, "causal_lm")
    runs = []
    for k, indices in enumerate(split_slices(len(examples), 2, SEED), start=1):
        (root / f"slice{k}.jsonl").write_text("".join(json.dumps({"text": examples[i].text}) + "\n" for i in indices))
        runs.append({"name": f"branch{k}", "method": "full", "data": str(root / f"slice{k}.jsonl"),
                     "train": {**TRAIN, "seed": SEED + k - 1}})
    launch_two_ranks({"model": str(tiny_lm["model"]), "data": str(data), "out": str(root / "ddp"), "runs": runs}, root)
    return {k: {"model": load_state(root / "ddp" / f"branch{k}"),
                "log": json.loads((root / "ddp" / f"branch{k}" / "training_log.json").read_text())} for k in (1, 2)}


def assert_close_states(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], atol=1e-6, rtol=1e-5, msg=f"{what}: {name}")


def assert_bam_equals_ddp(out: Path, ddp_branches: dict[int, dict]) -> None:
    """Each branch of OUT's work folder is the DDP run of its slice, and OUT is their average."""
    work = out.parent / f"{out.name}.work" / "round_1"
    for k in (1, 2):
        record = json.loads((work / f"branch_{k}" / "done.json").read_text())
        assert record["steps"] == STEPS and record["seed"] == SEED + k - 1
        assert record["loss"] == pytest.approx(ddp_branches[k]["log"][-1]["loss"], rel=1e-5)
        assert_close_states(load_state(work / f"branch_{k}" / record["model"]), ddp_branches[k]["model"], f"branch {k}")
    a, b = ddp_branches[1]["model"], ddp_branches[2]["model"]
    assert any(not torch.equal(a[n], b[n]) for n in a)  # two different branches: the average is a real check
    assert_close_states(load_state(out), {n: (a[n] + b[n]) / 2 for n in a}, "merged")


@pytest.mark.slow
def test_ray_train_branches_equal_ddp_branches_and_merge_to_their_average(local_ray, tiny_lm, data, ddp_branches, tmp_path):
    pytest.importorskip("ray.train.torch")
    out = tmp_path / "out"
    args = bam_args(tiny_lm["model"], data, out, "--executor", "ray", "--branch-workers", "2", "--branch-cpus", "1")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert_bam_equals_ddp(out, ddp_branches)
    rounds = json.loads((out / "bam.json").read_text())["rounds_log"]
    assert [b["branch"] for b in rounds[0]["branches"]] == [1, 2] and not any(b["skipped"] for b in rounds[0]["branches"])
    assert (out.parent / "out.work" / "round_1" / ".ray_train" / "branch_1").is_dir()  # Ray Train's record, in the work


def _kill_a_training_ray_train_worker(round_dir: Path, stop: threading.Event) -> int | None:
    """SIGKILL a Ray Train worker (Ray titles it ``ray::RayTrainWorker...``) once a branch trains: its training run's
    staging folder is there and the branch is not finished. (Killed in the first second of the group, Ray Train 2.60
    may take the death for a controller error and leave the group's placement group to the driver's end: a CLI
    run ends there, this test's Ray instance would not.) Only this process's descendants are searched: under
    pytest-xdist another test may run Ray workers of its own."""
    while not stop.is_set():
        if any(staging_folder(b / "train").is_dir() and not (b / "done.json").is_file() for b in round_dir.glob("branch_*")):
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmdline = proc.cmdline()
                except psutil.Error:  # ended between listing and reading
                    continue
                if any(part.startswith("ray::RayTrainWorker") for part in cmdline):
                    proc.send_signal(signal.SIGKILL)
                    return proc.pid
        time.sleep(0.02)
    return None


@pytest.mark.slow
def test_ray_train_branch_whose_worker_is_killed_is_retrained_by_the_rerun(local_ray, tiny_lm, data, ddp_branches,
                                                                          tmp_path):
    pytest.importorskip("ray.train.torch")
    out = tmp_path / "out"
    work = tmp_path / "out.work" / "round_1"
    args = bam_args(tiny_lm["model"], data, out, "--executor", "ray", "--branch-workers", "2", "--branch-cpus", "1")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=lambda: killed.append(_kill_a_training_ray_train_worker(work, stop)))
    killer.start()
    try:
        res = CliRunner().invoke(app, args)
    finally:
        stop.set()
        killer.join()
    assert killed[0] is not None
    message = " ".join(str(res.exception).split())
    assert res.exit_code == 1 and re.search(r"round 1: branch\(es\) \d failed .*worker rank \d.*rerun the same command",
                                            message), message
    finished = [(work / f"branch_{k}" / "done.json").is_file() for k in (1, 2)]
    assert sorted(finished) == [False, True] and not out.exists()  # the other branch trained to the end

    res = CliRunner().invoke(app, args)  # the rerun trains only the branch whose worker was killed
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    skipped = [b["skipped"] for b in json.loads((out / "bam.json").read_text())["rounds_log"][0]["branches"]]
    assert skipped == finished
    assert_bam_equals_ddp(out, ddp_branches)


def _torchrun_bam(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "deltawise", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_per_branch_equals_ddp_branches(tiny_lm, data, ddp_branches, tmp_path):
    """The alternative that --branch-workers' refusal names: one 2-process torchrun per --branch-index, then --merge-only."""
    out = tmp_path / "out"
    for k in (1, 2):
        _torchrun_bam(bam_args(tiny_lm["model"], data, out, "--branch-index", str(k)))
    assert not out.exists()
    res = CliRunner().invoke(app, bam_args(tiny_lm["model"], data, out, "--merge-only"))
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert_bam_equals_ddp(out, ddp_branches)
    rounds = json.loads((out / "bam.json").read_text())["rounds_log"]
    assert all(b["skipped"] for b in rounds[0]["branches"])  # --merge-only trained nothing


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_branch_workers_without_the_ray_executor_are_refused_naming_torchrun(tiny_lm, data, tmp_path, executor):
    res = CliRunner().invoke(app, bam_args(tiny_lm["model"], data, tmp_path / "out", "--executor", executor,
                                           "--branch-workers", "2"))
    message = " ".join((str(res.exception) + res.output).split())
    assert res.exit_code == 1 and isinstance(res.exception, InputError), message
    assert "--branch-workers 2" in message and "needs --executor ray" in message, message
    assert "torchrun --nproc_per_node 2 -m deltawise bam ... --branch-index K" in message and "--merge-only" in message
    assert not (tmp_path / "out.work" / "round_1").exists()  # refused before any work


def test_branch_workers_without_ray_train_are_refused_naming_torchrun(tiny_lm, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    monkeypatch.setitem(sys.modules, "ray.train", None)
    train = TrainConfig(model=tiny_lm["model"], data=data, output=tmp_path / "out", method="full", progress=False, **TRAIN)
    cfg = BamConfig(train=train, branches=2, merge="linear", executor="ray", branch_workers=2)
    with pytest.raises(InputError, match=r"need Ray Train .*deltawise\[ray\].*torchrun --nproc_per_node 2"):
        run_bam(cfg)
    assert not (tmp_path / "out.work" / "round_1").exists()


def test_a_multi_process_launch_of_bam_must_train_one_branch(tiny_lm, data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it (the process group starts later, in training)
    train = TrainConfig(model=tiny_lm["model"], data=data, output=tmp_path / "out", method="full", progress=False, **TRAIN)
    for merge_only in (False, True):
        with pytest.raises(InputError, match="launch of 2 processes .* add --branch-index K, and merge with --merge-only"):
            run_bam(BamConfig(train=train, branches=2, merge="linear", merge_only=merge_only))
    assert not (tmp_path / "out.work" / "round_1").exists()


def test_branch_workers_option_range_and_other_commands():
    res = CliRunner().invoke(app, ["bam", "m", "--data", "d", "-o", "o", "--branch-workers", "0"])
    assert res.exit_code == 2 and "branch-workers" in res.output
    for command in ("lr-sweep", "budget"):  # their jobs run in one process each: no such flag
        help_text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        assert "--job-workers" not in help_text and "--branch-workers" not in help_text and "--job-cpus" in help_text
    with pytest.raises(InputError, match="use the ray executor"):
        executor_for(ExecutorOptions("local", job_workers=2), 2)


def test_branch_workers_enter_the_fingerprint_only_when_several(tiny_lm, data, tmp_path):
    """N workers train with N x --batch-size a step, so a work folder of another N is refused; one worker keeps the
    fingerprint that existing work folders hold."""
    train = TrainConfig(model=tiny_lm["model"], data=data, output=tmp_path / "out", method="full", progress=False, **TRAIN)
    one = fingerprint(BamConfig(train=train), tiny_lm["model"])
    two = fingerprint(BamConfig(train=train, branch_workers=2), tiny_lm["model"])
    assert "branch_workers" not in one and two == {**one, "branch_workers": 2}
