"""``deltawise train`` under ``torchrun --nproc_per_node 2`` on CPU (gloo): every rank ends with the same
weights, and the result equals one process with the same global batch (2 × 4 = 8 examples a step).

One launch trains lift (a mask refresh at step 2), hft, sorsa (its pre-step regularizer backward),
lora (PEFT) and lift on a classification task (a DDP-synchronised head next to LIFT's values).
About 25 s on 2 idle CPU cores (55 s with the machine loaded 8-fold); marked slow, still in the
normal suite. Every one of the 13 methods was run the same way by hand (docs/adapt.md). A lora run interrupted
after its step-1 checkpoint resumes only with the launch it started with (2 processes), not in one process
(about 10 s more: a second launch).
The single-process references run with one thread, like each torchrun process: SORSA's regularizer
gradient at an orthonormal init is float noise scaled up, so it differs between thread counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapt_util import base_model, tiny_lm  # noqa: F401
from ddp_worker import config, launch_two_ranks, two_ranks_and_one
from safetensors.torch import load_file

import deltawise.adapt.train as train
from deltawise.adapt import run_train
from deltawise.delta.apply import apply_to_model
from deltawise.delta.store import DeltaFile
from deltawise.errors import OutputError

LIFT = {"rank": 2, "filter_rank": 4, "refresh_interval": 2}
ADAPTER = {"rank": 2, "targets": ["q_proj", "v_proj"]}
RUNS = [
    {"name": "lift", "method": "lift", "method_params": LIFT},
    {"name": "hft", "method": "hft", "method_params": {}},
    {"name": "sorsa", "method": "sorsa", "method_params": ADAPTER},
    {"name": "lora", "method": "lora", "method_params": ADAPTER},
    {"name": "lift_cls", "method": "lift", "task": "classification", "data": "cls", "method_params": LIFT},
]


TRAIN = {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3}
# lora, stopped after step 2 with a checkpoint at step 1, left for a resume into ddp/lora_resumed
CUT = {"name": "lora_cut", "output": "lora_resumed", "method": "lora", "method_params": ADAPTER, "stop_at": 2,
       "train": {**TRAIN, "save_every": 1}, "launch_only": True}


@pytest.fixture(scope="module")
def ddp_runs(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    runs = [{**r, "data": str(tiny_lm[r.get("data", "data")]), "train": TRAIN} for r in RUNS] + [CUT]
    spec = {"model": str(tiny_lm["model"]), "data": str(tiny_lm["data"]), "out": str(root / "ddp"), "runs": runs}
    two_ranks_and_one(spec, root)  # the single-process references: one thread, 8 examples a step
    return root, tiny_lm


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", [r["name"] for r in RUNS])
def test_two_processes_match_each_other_and_one_process(name, ddp_runs):
    root, _ = ddp_runs
    r0, r1 = (load_file(root / "ddp" / f"{name}.rank{r}.safetensors") for r in (0, 1))
    single = load_file(root / "single" / f"{name}.single.safetensors")
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{name}: ranks differ at {k}"
        torch.testing.assert_close(r0[k], single[k], atol=1e-5, rtol=1e-4, msg=f"{name}: 2 processes vs 1 at {k}")
    meta = json.loads((root / "ddp" / name / "deltawise_train.json").read_text())
    assert meta["steps"] == 3
    log = json.loads((root / "ddp" / name / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in log)


@pytest.mark.parametrize("name", ["lift", "lift_cls"])
def test_lift_under_ddp_changes_only_masked_entries(name, ddp_runs):
    root, tiny_lm = ddp_runs
    task = "classification" if name == "lift_cls" else "causal_lm"
    trained = load_file(root / "ddp" / f"{name}.rank0.safetensors")
    base = base_model(tiny_lm["model"], task, 2 if task == "classification" else None)
    delta = DeltaFile(root / "ddp" / name)
    linears = {f"{n}.weight" for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n not in ("lm_head", "score")}
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged = apply_to_model(base, root / "ddp" / name).state_dict()
    for k, w in before.items():
        if k in linears:
            mask = delta.get(k).mask()
            changed = trained[k] != w
            assert changed.any() and not changed[~mask].any(), f"{k}: an entry outside the masks changed"
            torch.testing.assert_close(merged[k], trained[k], atol=1e-6, rtol=0)
        elif k == "score.weight":
            assert torch.equal(merged[k], trained[k])  # the new head, saved whole
        else:
            assert torch.equal(trained[k], w), f"{k} is frozen in LIFT"


def test_an_interrupted_run_resumes_only_with_the_launch_it_started_with(ddp_runs, monkeypatch):
    """--batch-size is per process, and so are the checkpoint's RNG states: the 2-process run resumed in one process
    is refused before the model is loaded, with the same --batch-size (half the global batch) and with the same global
    batch (1 × 8, refused too: it equals the 2-process run only without randomness and when the batches divide the
    data, docs/adapt.md), and the interrupted run stays; resumed with 2 processes, it ends as the uninterrupted run."""
    root, tiny_lm = ddp_runs
    out = root / "ddp"
    checkpoint = out / ".lora_resumed.deltawise-partial" / "_trainer" / "checkpoint-1"
    assert {p.name for p in checkpoint.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    spec = {"model": str(tiny_lm["model"]), "data": str(tiny_lm["data"]), "out": str(out)}
    resume = {**CUT, "name": "lora_resumed", "train": {**CUT["train"], "resume": True}}
    del resume["stop_at"], resume["output"]
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    for batch, extra in ((4, ""), (8, "--batch-size, ")):
        cfg = config(spec, {**resume, "train": {**resume["train"], "batch_size": batch}}, out / "lora_resumed")
        with pytest.raises(OutputError, match=rf"differs in: {extra}the launch \(2 processes × --batch-size 4 then, 1 × {batch} "
                                              r"now: resume with the launch the run was started with, 2 processes × "
                                              r"--batch-size 4\)"):
            run_train(cfg)
        assert (checkpoint / "trainer_state.json").is_file() and not (out / "lora_resumed").exists()
    launch_two_ranks({**spec, "runs": [resume]}, root / "resume")
    resumed, whole = load_file(out / "lora_resumed.rank0.safetensors"), load_file(out / "lora.rank0.safetensors")
    assert resumed.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], atol=1e-5, rtol=1e-4, msg=f"lora resumed in 2 processes: {k}")
    meta = json.loads((out / "lora_resumed" / "deltawise_train.json").read_text())
    assert meta["resumed_from_step"] == 1 and meta["steps"] == 3
