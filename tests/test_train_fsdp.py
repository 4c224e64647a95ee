"""``deltawise train`` sharded with FSDP2 (accelerate's environment, as ``accelerate launch`` sets it from an
``fsdp_version: 2`` config) in 2 CPU processes (gloo): the weights each rank gathers at the end equal one
process training with the same global batch (2 × 4 = 8 examples a step), for full fine-tuning, HFT (half
the matrices frozen inside one shard group), LIFT (masks from whole matrices, one refresh) and LoRA (PEFT),
and the saved output holds the full tensors.

Marked slow (one torchrun launch of three 3-step runs on a 2-layer Llama); the reference runs in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapt_util import tiny_lm  # noqa: F401
from ddp_worker import two_ranks_and_one
from safetensors import safe_open
from safetensors.torch import load_file

from deltawise.adapt.sharding import check_fsdp
from deltawise.errors import InputError

RUNS = [
    {"name": "full", "method": "full", "method_params": {}},
    {"name": "hft", "method": "hft", "method_params": {}},
    # LIFT: masks chosen from whole matrices, refreshed after step 2 (Adam moments carried over by shard)
    {"name": "lift", "method": "lift", "method_params": {"rank": 2, "filter_rank": 2, "refresh_interval": 2}},
    {"name": "lora", "method": "lora", "method_params": {"rank": 2, "targets": ["q_proj", "v_proj"]}},
]
# what ``accelerate launch`` exports for a config with distributed_type: FSDP and these fsdp_config keys
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
            "FSDP_RESHARD_AFTER_FORWARD": "true"}


@pytest.fixture(scope="module")
def fsdp_runs(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    runs = [{**r, "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3}} for r in RUNS]
    spec = {"model": str(tiny_lm["model"]), "data": str(tiny_lm["data"]), "out": str(root / "fsdp"), "runs": runs}
    two_ranks_and_one(spec, root, FSDP_ENV)
    return root


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
        torch.testing.assert_close(r0[k], single[k], atol=1e-5, rtol=1e-4, msg=f"{name}: FSDP vs 1 process at {k}")
    assert json.loads((root / "fsdp" / name / "deltawise_train.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_fsdp_outputs_equal_one_process_outputs(fsdp_runs):
    """What rank 0 wrote (model folder, delta shards, adapter) is the same as the single process's output."""
    root = fsdp_runs
    for name, pattern in (("full", "*.safetensors"), ("hft", "*.safetensors"), ("lift", "*.safetensors"),
                          ("lora", "adapter_model.safetensors")):
        files = sorted((root / "fsdp" / name).glob(pattern))
        assert files, f"{name}: nothing saved"
        for f in files:
            sharded, single = load_file(f), load_file(root / "single" / name / f.name)
            assert sharded.keys() == single.keys()
            for k in sharded:
                torch.testing.assert_close(sharded[k], single[k], atol=1e-5, rtol=1e-4, msg=f"{name}/{f.name}: {k}")


def test_methods_that_index_whole_matrices_are_refused_under_fsdp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for method in ("sorsa", "kasa", "loldu", "osf"):
        with pytest.raises(InputError, match="does not run sharded"):
            check_fsdp(method, "delta")
    check_fsdp("lift", "delta")
    check_fsdp("lora", "peft")
    check_fsdp("full", "full")
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
