"""``deltawise train`` sharded with FSDP2 (accelerate's environment, as ``accelerate launch`` sets it from an
``fsdp_version: 2`` config) in 2 CPU processes (gloo): the weights each rank gathers at the end equal one
process training with the same global batch (2 × 4 = 8 examples a step), for full fine-tuning, HFT (half
the matrices frozen inside one shard group), LIFT (masks from whole matrices, one refresh), our own adapters
SORSA and KaSA (regularisers over whole factors, weighted so that they move the result), LoLDU, OSF (PEFT's
gradient projection, which FSDP's parameter swap would drop), and every PEFT adapter whose mechanism differs
from LoRA's: LoRA, LoRA-FA (its optimizer projects B's gradient with (AAᵀ)⁻¹ of the whole A), DoRA (magnitude
vectors), PiSSA and CorDA (initialised from the weights / calibration data before sharding, converted to a
plain LoRA on save), RandLoRA (shared frozen random bases), MiSS and FourierFT; the saved output holds the full
tensors. (LoRA with ``-p init=eva`` is tested sharded in tests/test_train_eva_ddp.py.) A sharded run interrupted
after its checkpoint and resumed sharded ends where the uninterrupted sharded run ends (full; LIFT, whose masks
ride in the checkpoint and refresh after the resume; SORSA and KaSA, whose regularisers gather whole factors
again after the resume; LoLDU; OSF, whose delta is taken against factors computed again at the resume; LoRA).

Marked slow (one torchrun launch of 3-step runs on a 2-layer Llama; the file takes about 2.5 minutes on 2 cores); the references
run in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapt_util import tiny_lm  # noqa: F401
from ddp_worker import launch_two_ranks, two_ranks_and_one
from safetensors import safe_open
from safetensors.torch import load_file

from deltawise.adapt.methods.base import REGISTRY
from deltawise.adapt.sharding import FSDP_METHODS_OWN, FSDP_METHODS_PEFT, check_fsdp
from deltawise.errors import InputError

QV = ["q_proj", "v_proj"]
RUNS = [
    {"name": "full", "method": "full", "method_params": {}},
    {"name": "hft", "method": "hft", "method_params": {}},
    # LIFT: masks chosen from whole matrices, refreshed after step 2 (Adam moments carried over by shard)
    {"name": "lift", "method": "lift", "method_params": {"rank": 2, "filter_rank": 2, "refresh_interval": 2}},
    # SORSA: γ/η·∇L_o added before the step, over whole U and Vᵀ (γ/η = 10: its gradient dominates)
    {"name": "sorsa", "method": "sorsa", "method_params": {"rank": 2, "gamma": 0.1}},
    # KaSA: β‖d‖² + γ(‖BᵀB − I‖ + ‖AAᵀ − I‖) in the loss, over whole factors
    {"name": "kasa", "method": "kasa", "method_params": {"rank": 2, "beta": 0.1, "gamma": 0.1}},
    {"name": "loldu", "method": "loldu", "method_params": {"rank": 2}},
    # OSF: the gradients of U_l and V_l projected away from the frozen top subspace (without it: 5e-3 apart)
    {"name": "osf", "method": "osf", "method_params": {"targets": QV}},
    {"name": "lora", "method": "lora", "method_params": {"rank": 2, "targets": QV}},
    # LoRA-FA: A frozen, B's gradient times (AAᵀ + δI)⁻¹/s² in PEFT's optimizer, from the whole A
    {"name": "lora_fa", "method": "lora_fa", "method_params": {"rank": 2, "targets": QV}},
    {"name": "dora", "method": "dora", "method_params": {"rank": 2, "targets": QV}},
    # PiSSA, CorDA: factors from the SVD of W (CorDA: of W·C, C from --data) and W − s·BA before sharding; the
    # saved adapter converted against the initial one (PEFT loads it into the model being saved)
    {"name": "pissa", "method": "pissa", "method_params": {"rank": 2, "targets": QV}},
    {"name": "corda", "method": "corda", "method_params": {"rank": 2, "targets": QV, "calibration": "--data",
                                                           "calibration_examples": 4, "calibration_length": 16}},
    {"name": "randlora", "method": "randlora", "method_params": {"rank": 4, "targets": QV}},
    {"name": "miss", "method": "miss", "method_params": {"rank": 4, "targets": QV}},
    {"name": "fourierft", "method": "fourierft", "method_params": {"n_frequency": 64, "targets": QV}},
]
PEFT = ("lora", "lora_fa", "dora", "pissa", "corda", "randlora", "miss", "fourierft")
# what each run's output folder holds (default: *.safetensors)
OUTPUTS = {name: "adapter_model.safetensors" for name in PEFT}
# interrupted after step 2 (checkpoint at step 1, before LIFT's first refresh) and resumed, all sharded
RESUMED = ("full", "lift", "sorsa", "kasa", "loldu", "osf", "lora")
# what ``accelerate launch`` exports for a config with distributed_type: FSDP and these fsdp_config keys
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
            "FSDP_RESHARD_AFTER_FORWARD": "true"}
TRAIN = {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3}
# FSDP against one process: the gradients are summed in another order (reduce-scatter of shards), and Adam turns a
# float32 rounding of a near-zero gradient into up to ~1e-3 of lr per step (its update is scale-free). Measured on one
# 2-core machine (AMD EPYC, 2026-12-04): full fine-tuning 1.7e-5 apart at most after 3 steps at lr 1e-2; a gradient
# left unreduced would put them ~lr apart. Sharded runs against sharded runs stay at the tight tolerance.
ONE_PROCESS = {"atol": 5e-5, "rtol": 1e-4}
SAME_SHARDING = {"atol": 1e-5, "rtol": 1e-4}


def _resumed_runs() -> list[dict]:
    out = []
    for name in RESUMED:
        run = next(r for r in RUNS if r["name"] == name)
        train = {**TRAIN, "save_every": 1}
        out += [{**run, "name": f"{name}_cut", "output": f"{name}_resumed", "stop_at": 2, "train": train, "launch_only": True},
                {**run, "name": f"{name}_resumed", "train": {**train, "resume": True}, "launch_only": True}]
    return out


@pytest.fixture(scope="module")
def fsdp_runs(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    runs = [{**r, "train": TRAIN} for r in RUNS] + _resumed_runs()
    for r in runs:  # CorDA calibrates on the training data
        if r["method_params"].get("calibration") == "--data":
            r["method_params"] = {**r["method_params"], "calibration": str(tiny_lm["data"])}
    spec = {"model": str(tiny_lm["model"]), "data": str(tiny_lm["data"]), "out": str(root / "fsdp"), "runs": runs}
    two_ranks_and_one(spec, root, FSDP_ENV, timeout=600)  # 23 runs in one launch
    return root


def _assert_same_outputs(a: Path, b: Path, pattern: str, what: str, tolerance: dict = SAME_SHARDING) -> None:
    files = sorted(a.glob(pattern))
    assert files, f"{what}: nothing saved"
    for f in files:
        x, y = load_file(f), load_file(b / f.name)
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], **tolerance, msg=f"{what}/{f.name}: {k}")


@pytest.mark.slow
@pytest.mark.parametrize("name", [r["name"] for r in RUNS])
def test_fsdp_matches_one_process(name, fsdp_runs):
    root = fsdp_runs
    r0, r1 = (load_file(root / "fsdp" / f"{name}.rank{r}.safetensors") for r in (0, 1))
    with safe_open(root / "fsdp" / f"{name}.rank0.safetensors", "pt") as f:
        assert f.metadata()["sharded"] == "True", f"{name}: the parameters were not sharded during training"
    single = load_file(root / "single" / f"{name}.single.safetensors")
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert r0[k].shape == single[k].shape, f"{name}: {k} was saved as a shard"
        assert torch.equal(r0[k], r1[k]), f"{name}: ranks differ at {k}"
        torch.testing.assert_close(r0[k], single[k], **ONE_PROCESS, msg=f"{name}: FSDP vs 1 process at {k}")
    assert json.loads((root / "fsdp" / name / "deltawise_train.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_fsdp_outputs_equal_one_process_outputs(fsdp_runs):
    """What rank 0 wrote (model folder, delta shards, adapter) is the same as the single process's output."""
    root = fsdp_runs
    for r in RUNS:
        _assert_same_outputs(root / "fsdp" / r["name"], root / "single" / r["name"],
                             OUTPUTS.get(r["name"], "*.safetensors"), r["name"], ONE_PROCESS)


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMED)
def test_fsdp_resumed_run_equals_the_uninterrupted_sharded_run(name, fsdp_runs):
    """Trainer's FSDP2 checkpoint (full state dicts of the model and the sharded optimizer) resumes sharded: the run
    stopped after step 2 and continued from its step-1 checkpoint ends with the weights, output and log of the
    uninterrupted run."""
    out = fsdp_runs / "fsdp"
    resumed, whole = load_file(out / f"{name}_resumed.rank0.safetensors"), load_file(out / f"{name}.rank0.safetensors")
    assert resumed.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], **SAME_SHARDING, msg=f"{name} resumed: {k}")
    _assert_same_outputs(out / f"{name}_resumed", out / name, OUTPUTS.get(name, "*.safetensors"), f"{name} resumed")
    meta = json.loads((out / f"{name}_resumed" / "deltawise_train.json").read_text())
    assert meta["resumed_from_step"] == 1 and meta["steps"] == 3
    log, whole_log = (json.loads((out / n / "training_log.json").read_text()) for n in (f"{name}_resumed", name))
    assert [r["step"] for r in log] == [1, 2, 3]  # step 1 from the checkpoint's log, steps 2-3 trained again
    for a, b in zip(log, whole_log):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_only_methods_tested_sharded_run_under_fsdp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for method in ("full", "hft", "lift", "sorsa", "kasa", "loldu", "osf"):  # each one trained sharded above
        assert method in FSDP_METHODS_OWN
        check_fsdp(method, "full" if method == "full" else "delta")
    for method in PEFT:
        assert method in FSDP_METHODS_PEFT
        check_fsdp(method, "peft")
    check_fsdp("bone", "peft")  # miss's old name
    assert set(FSDP_METHODS_OWN) | set(FSDP_METHODS_PEFT) - {"bone"} <= {r["method"] for r in RUNS}
    assert set(REGISTRY) == set(FSDP_METHODS_OWN) | set(FSDP_METHODS_PEFT)  # every method runs sharded
    for kind in ("delta", "peft"):  # a method not yet tested sharded is refused, ours or PEFT's
        with pytest.raises(InputError, match="does not run sharded"):
            check_fsdp("an_untested_method", kind)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(InputError, match="fsdp_version: 2"):
        check_fsdp("full", "full")


def test_deepspeed_zero3_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(InputError, match="ZeRO-3 is not supported"):
        check_fsdp("full", "full")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    with pytest.raises(InputError, match="ZeRO-3"):
        check_fsdp("lora", "peft")
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    check_fsdp("full", "full")  # ZeRO-2 keeps whole parameters on every rank


def test_a_state_dict_loaded_inside_full_parameters_meets_no_fsdp_hook():
    """PiSSA's and CorDA's save loads the initial adapter into the model within ``full_parameters``: FSDP2's
    load hook (which takes the module's tensor for its shard) is held back there and is back afterwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from deltawise.adapt.sharding import full_parameters

    if dist.is_initialized() or not dist.is_gloo_available():
        pytest.skip("needs its own gloo process group")
    dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        fully_shard(model[0], mesh=init_device_mesh("cpu", (1,)))
        hooks = dict(model[0]._load_state_dict_post_hooks)
        assert isinstance(model[0].weight, DTensor) and hooks
        twos = {k: torch.full(v.shape, 2.0) for k, v in model.state_dict().items()}
        with full_parameters(model, keep=True) as full:
            assert not isinstance(full[0].weight, DTensor)
            full.load_state_dict(twos)  # FSDP's hook would fail here: the module holds a plain tensor
            assert torch.equal(full[0].weight, twos["0.weight"]) and not full[0]._load_state_dict_post_hooks
        assert isinstance(model[0].weight, DTensor) and model[0]._load_state_dict_post_hooks == hooks
        model.load_state_dict(model.state_dict())  # through FSDP's hooks again
        assert isinstance(model[0].weight, DTensor)
    finally:
        dist.destroy_process_group()


# SHARDED_STATE_DICT: each process writes its own shards of the model and optimizer into the checkpoint
SHARDED_RESUMED = ("full", "lora")


@pytest.fixture(scope="module")
def sharded_checkpoint_runs(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_sharded_checkpoints")
    runs = []
    for name in SHARDED_RESUMED:
        run = next(r for r in RUNS if r["name"] == name)
        train = {**TRAIN, "save_every": 1}
        runs += [{**run, "train": train, "launch_only": True},
                 {**run, "name": f"{name}_cut", "output": f"{name}_resumed", "stop_at": 2, "train": train, "launch_only": True},
                 {**run, "name": f"{name}_resumed", "train": {**train, "resume": True}, "launch_only": True}]
    full = next(r for r in RUNS if r["name"] == "full")  # left interrupted, for a resume without FSDP
    runs.append({**full, "name": "left_cut", "output": "left", "stop_at": 2, "train": {**TRAIN, "save_every": 1},
                 "launch_only": True})
    spec = {"model": str(tiny_lm["model"]), "data": str(tiny_lm["data"]), "out": str(root / "fsdp"), "runs": runs}
    launch_two_ranks(spec, root, {**FSDP_ENV, "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, timeout=600)
    return root / "fsdp"


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARDED_RESUMED)
def test_sharded_state_dict_checkpoints_resume(name, sharded_checkpoint_runs):
    """With ``fsdp_state_dict_type: SHARDED_STATE_DICT`` the checkpoint holds each process's shards; a run resumed
    from it ends with the uninterrupted run's weights and output."""
    out = sharded_checkpoint_runs
    resumed, whole = load_file(out / f"{name}_resumed.rank0.safetensors"), load_file(out / f"{name}.rank0.safetensors")
    assert resumed.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], **SAME_SHARDING, msg=f"{name} resumed: {k}")
    _assert_same_outputs(out / f"{name}_resumed", out / name, OUTPUTS.get(name, "*.safetensors"), f"{name} resumed")
    assert json.loads((out / f"{name}_resumed" / "deltawise_train.json").read_text())["resumed_from_step"] == 1


@pytest.mark.slow
def test_a_sharded_checkpoint_resumed_without_fsdp_is_refused_before_loading(tiny_lm, sharded_checkpoint_runs):
    """Only an FSDP launch of as many processes can load an FSDP checkpoint (its shards are DCP files, one set a
    process): a resume in one process without FSDP is refused by the run's key, naming both causes, and the
    interrupted run stays for a proper resume."""
    from ddp_worker import config

    from deltawise.adapt import run_train
    from deltawise.errors import OutputError

    out = sharded_checkpoint_runs
    checkpoint = next((out / ".left.deltawise-partial" / "_trainer").glob("checkpoint-*"))
    assert list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))  # a sharded checkpoint
    spec = {"model": str(tiny_lm["model"]), "data": str(tiny_lm["data"])}
    full = next(r for r in RUNS if r["name"] == "full")
    cfg = config(spec, {**full, "train": {**TRAIN, "save_every": 1, "resume": True}}, out / "left")
    with pytest.raises(OutputError, match=r"differs in: the launch \(2 processes × --batch-size 4 then, 1 × 4 now: .*\), "
                                          r"sharding \(FSDP then, none now"):
        run_train(cfg)
    assert checkpoint.is_dir() and not (out / "left").exists()
