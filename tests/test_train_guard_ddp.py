"""``train --retain`` under ``torchrun --nproc_per_node 2`` on CPU (gloo): both ranks take the same decisions at the
same steps (the checks, the kept step, stopping early; rank 0's broadcast), and the guard's outputs (the checks in
training_log.json, deltawise_guard.json, the kept weights) equal one process with the global batch (2 × 4 = 8).

Run "fixed" checks every 3 steps; run "auto" measures the interval (rank 0's times decide), stops early with
patience 1 and writes checkpoints with the guard's state every 4 steps (rank 0); "cut" is "whole" interrupted at
step 8 on both ranks and resumed from its step-6 checkpoint ("resumed"). A sharded (FSDP) launch is refused.
Marked slow (about 60 s on 2 shared CPU cores), still in the normal suite."""

from __future__ import annotations

import json

import pytest
import torch
from ddp_worker import config, launch_two_ranks, train_run
from guard_util import guard_cfg, langs  # noqa: F401
from safetensors.torch import load_file

from deltawise.adapt.guard_resume import GUARD_STATE
from deltawise.adapt.guarded import GuardRequest, guarded_train
from deltawise.io.output import staging_folder
from deltawise.errors import InputError
from deltawise.search.budget import RetentionBudget

TRAIN = {"max_steps": 12, "batch_size": 4, "lr": 3e-3, "schedule": "constant", "seed": 0}


@pytest.fixture(scope="module")
def ddp_guard(langs, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("guard_ddp")
    guard = {"retain": [[str(langs["en"]), 0.8]], "targets": [str(langs["de_target"])]}
    every3 = {**guard, "options": {"monitor_every": 3}}
    saved = {**TRAIN, "save_every": 6}
    runs = [{"name": "fixed", "method": "full", "train": TRAIN, "guard": every3},
            {"name": "auto", "method": "full", "train": {**TRAIN, "save_every": 4},
             "guard": {**guard, "options": {"monitor_every": 0, "stop_early": True, "patience": 1}}},
            {"name": "whole", "method": "full", "train": saved, "guard": every3},
            {"name": "cut", "output": "resumed", "stop_at": 8, "method": "full", "train": saved, "guard": every3},
            {"name": "resumed", "method": "full", "train": {**saved, "resume": True}, "guard": every3}]
    spec = {"model": str(langs["base"]), "data": str(langs["de"]), "out": str(root / "ddp"), "runs": runs}
    launch_two_ranks(spec, root)
    # the single-process reference of "fixed": one thread (as each torchrun process), the global batch of 8
    single = {**spec, "out": str(root / "single")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = {**runs[0], "train": {**TRAIN, "batch_size": 2 * TRAIN["batch_size"]}}
        train_run(config(single, run, root / "single" / "fixed"), run, [], root / "single" / "fixed.guard.json")
    finally:
        torch.set_num_threads(threads)
    return root


pytestmark = pytest.mark.slow


def _guard(root, name: str, suffix: str) -> dict:
    return json.loads((root / f"{name}.guard{suffix}.json").read_text())


@pytest.mark.parametrize("name", ["fixed", "auto", "resumed"])
def test_both_ranks_take_the_same_decisions(ddp_guard, name):
    r0, r1 = (_guard(ddp_guard / "ddp", name, str(r)) for r in (0, 1))
    assert r0 == r1  # every check, its numbers and times, the kept step, the stop, the held-out report: rank 0's
    assert r0["points"] and r0["points"][-1]["step"] == (r0["stopped_early_at"] or 12)
    assert (ddp_guard / "ddp" / name / "deltawise_guard.json").is_file()


def test_two_processes_equal_one_process_with_the_global_batch(ddp_guard):
    ddp, single = _guard(ddp_guard / "ddp", "fixed", "0"), _guard(ddp_guard / "single", "fixed", "")
    assert [p["step"] for p in ddp["points"]] == [p["step"] for p in single["points"]] == [3, 6, 9, 12]
    assert ddp["kept_step"] == single["kept_step"] < 12 and ddp["budget_met"] and single["budget_met"]
    for a, b in zip(ddp["points"], single["points"]):
        assert (a["feasible"], a["kept"]) == (b["feasible"], b["kept"])
        for key in ("retention", "retention_lower"):
            assert a[key]["en"] == pytest.approx(b[key]["en"], rel=1e-4)
        assert a["gain"] == pytest.approx(b["gain"], rel=1e-4)
        assert a["retention_ci"]["en"] == pytest.approx(b["retention_ci"]["en"], rel=1e-4)
    for key in ("retention", "gain"):
        assert ddp["heldout"][key] == pytest.approx(single["heldout"][key], rel=1e-4)
    # the written model is the kept step's weights, as one process writes them
    written = load_file(ddp_guard / "ddp" / "fixed" / "model.safetensors")
    reference = load_file(ddp_guard / "single" / "fixed" / "model.safetensors")
    assert written.keys() == reference.keys()
    for k in written:
        torch.testing.assert_close(written[k], reference[k], atol=1e-5, rtol=1e-4, msg=k)
    logs = [json.loads((ddp_guard / where / "fixed" / "training_log.json").read_text()) for where in ("ddp", "single")]
    checks = [[(r["step"], r["guard"]["kept"]) for r in log if "guard" in r] for log in logs]
    assert checks[0] == checks[1] and [r["step"] for r in logs[0] if "loss" in r] == list(range(1, 13))
    records = [json.loads((ddp_guard / where / "fixed" / "deltawise_guard.json").read_text()) for where in ("ddp", "single")]
    assert records[0]["chosen"]["step"] == records[1]["chosen"]["step"] == ddp["kept_step"]
    assert records[0]["chosen"]["heldout"]["within_budget"] == records[1]["chosen"]["heldout"]["within_budget"]


def test_a_sharded_launch_is_refused_before_training(langs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(InputError, match="--retain does not run sharded"):
        guarded_train(guard_cfg(langs, tmp_path / "o"), GuardRequest(retain=[RetentionBudget(langs["en"], 0.8)]))
    assert not (tmp_path / "o").exists()


def test_a_resumed_two_process_run_equals_the_uninterrupted_one(ddp_guard):
    ddp = ddp_guard / "ddp"
    assert not (ddp / "cut").exists() and not staging_folder(ddp / "resumed").exists()  # resumed, then renamed into place
    whole, resumed = _guard(ddp, "whole", "0"), _guard(ddp, "resumed", "0")
    for state in (whole, resumed):
        for p in state["points"]:
            p.pop("seconds")
    assert resumed == whole and whole["kept_step"] <= 6  # the kept weights came from the checkpoint (rank 0's)
    a, b = load_file(ddp / "whole" / "model.safetensors"), load_file(ddp / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((ddp / "resumed" / "deltawise_train.json").read_text())
    assert meta["resumed_from_step"] == 6 and not list(ddp.glob(f"**/{GUARD_STATE}"))


def test_bam_retain_under_several_processes_is_refused(langs, tmp_path, monkeypatch):  # noqa: F811
    from deltawise.adapt.bam import BamConfig
    from deltawise.adapt.bam_guard import guarded_bam

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, before any process group starts
    with pytest.raises(InputError, match="bam --retain runs in one process"):
        guarded_bam(BamConfig(train=guard_cfg(langs, tmp_path / "o")), GuardRequest(retain=[RetentionBudget(langs["en"], 0.8)]))
    assert not (tmp_path / "o").exists()
