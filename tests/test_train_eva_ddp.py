"""EVA (``-m lora -p init=eva``) in 2 gloo processes under DDP and under FSDP2 (tests/test_train_fsdp.py's settings).

Every rank starts from the same adapter: rank 0's, equal to the EVA initialisation of one process with the global
batch (2 × 4 = 8 rows per SVD step; ranks redistributed, so module shapes differ from r), and 3 training steps end
where that process ends. A second run skews rank 1's SVD (other batches, so other ranks), as a device whose SVD
differs in its last bits might: rank 1 still starts from rank 0's adapter. Without that broadcast, DDP stopped at
its parameter-shape check and FSDP at a gloo size mismatch (found by hand, adapt/methods/eva.py).
One torchrun launch per mode (about 30 s each on 2 idle cores); marked slow, as the other multi-process tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapt_util import base_model, tiny_lm, train_cfg  # noqa: F401
from ddp_worker import SaveInit, SaveWeights, config, launch_two_ranks, skewed
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_fsdp import FSDP_ENV

from deltawise.adapt import get_method, run_train
from deltawise.errors import OutputError

TESTS = Path(__file__).parent
EVA = {"rank": 2, "alpha": 4, "targets": ["q_proj", "down_proj"], "init": "eva", "eva_rho": 4}
TRAIN = {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3}
RUNS = [{"name": "eva", "method": "lora", "method_params": EVA, "save_init": True},
        {"name": "eva_skew", "method": "lora", "method_params": EVA, "save_init": True, "skew_rank1_init": True}]


def _launch(tiny_lm, root: Path, env: dict[str, str]) -> Path:
    runs = [{**r, "train": TRAIN} for r in RUNS]
    launch_two_ranks({"model": str(tiny_lm["model"]), "data": str(tiny_lm["data"]), "out": str(root), "runs": runs},
                     root.parent / f"{root.name}-spec", env)
    return root


@pytest.fixture(scope="module")
def launches(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("eva_ddp")
    out = {"ddp": _launch(tiny_lm, root / "ddp", {}), "fsdp": _launch(tiny_lm, root / "fsdp", FSDP_ENV)}
    # one process, one thread (like each torchrun process), the global batch of 8: its init and its final weights
    single = root / "single"
    spec = {"model": str(tiny_lm["model"]), "data": str(tiny_lm["data"])}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = {**RUNS[0], "train": {**TRAIN, "batch_size": 8}}
        run_train(config(spec, run, single / "eva"), callbacks=[SaveInit(single / "eva.init.safetensors"),
                                                              SaveWeights(single / "eva.single.safetensors")])
    finally:
        torch.set_num_threads(threads)
    return out, single


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", ["eva", "eva_skew"])
def test_every_rank_starts_from_rank0s_eva_adapter_which_is_one_process_with_the_global_batch(mode, name, launches):
    out, single = launches
    r0, r1 = (load_file(out[mode] / f"{name}.init{r}.safetensors") for r in (0, 1))
    reference = load_file(single / "eva.init.safetensors")
    assert r0.keys() == r1.keys() == reference.keys() and any("lora_A" in k for k in r0)
    rows = {k: v.shape[0] for k, v in reference.items() if "lora_A" in k}
    assert len(set(rows.values())) > 1  # ranks redistributed: the shapes themselves come from the SVD
    for k in r0:
        assert r0[k].shape == r1[k].shape == reference[k].shape, f"{mode}/{name}: {k}"
        assert torch.equal(r0[k], r1[k]), f"{mode}/{name}: ranks start from different adapters at {k}"
        torch.testing.assert_close(r0[k], reference[k], atol=1e-5, rtol=1e-4, msg=f"{mode}/{name}: vs 1 process at {k}")
    meta = json.loads((out[mode] / name / "deltawise_train.json").read_text())
    assert meta["method_record"] == json.loads((single / "eva" / "deltawise_train.json").read_text())["method_record"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", ["eva", "eva_skew"])
def test_training_from_it_equals_one_process_with_the_global_batch(mode, name, launches):
    out, single = launches
    r0, r1 = (load_file(out[mode] / f"{name}.rank{r}.safetensors") for r in (0, 1))
    with safe_open(out[mode] / f"{name}.rank0.safetensors", "pt") as f:
        assert f.metadata()["sharded"] == str(mode == "fsdp")
    reference = load_file(single / "eva.single.safetensors")
    assert r0.keys() == r1.keys() == reference.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{mode}/{name}: ranks differ at {k}"
        torch.testing.assert_close(r0[k], reference[k], atol=1e-5, rtol=1e-4, msg=f"{mode}/{name}: vs 1 process at {k}")
    saved, expected = (load_file(d / "adapter_model.safetensors") for d in (out[mode] / name, single / "eva"))
    assert saved.keys() == expected.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], expected[k], atol=1e-5, rtol=1e-4, msg=f"{mode}/{name}: saved {k}")
    assert json.loads((out[mode] / name / "deltawise_train.json").read_text())["steps"] == 3


def _eva_ranks(tiny_lm, batches) -> dict[str, int]:
    method = get_method("lora", EVA)
    method.initialise(method.prepare(base_model(tiny_lm["model"]), "causal_lm", 0), batches, None, None)
    return method.record()["eva_ranks"]


def test_the_skewed_rank_computes_other_ranks_so_the_broadcast_is_what_makes_them_equal(tiny_lm, tmp_path):
    """The skew above is a real one: rank 1's own SVD gives other per-layer ranks than rank 0's (module shapes)."""
    from deltawise.adapt.data import read_examples, tokenize
    from deltawise.adapt.train import _init_batches, load_tokenizer

    tok = load_tokenizer(tiny_lm["model"])
    cfg = train_cfg(tiny_lm, tmp_path / "o", "lora", EVA, **TRAIN)
    rows = tokenize(read_examples(tiny_lm["data"], "causal_lm"), tok, cfg.max_length, "causal_lm", None)
    own, other = (_eva_ranks(tiny_lm, make(rows, tok.pad_token_id, cfg, 8)) for make in (_init_batches, skewed(_init_batches)))
    assert own.keys() == other.keys() and own != other


def test_a_resume_with_another_process_count_is_refused_for_eva_only(tiny_lm, tmp_path):
    """EVA's batch is the global one (processes × --batch-size): a resume with another count would rebuild other ranks."""
    from deltawise.adapt.checkpoints import TRAINER_DIR, open_run_staging, run_key

    out = tmp_path / "out"
    cfg = train_cfg(tiny_lm, out, "lora", EVA, **TRAIN)
    values = get_method("lora", EVA).values
    staging, _ = open_run_staging(out, run_key(cfg, values, "fp", 8), resume=False)
    (staging / TRAINER_DIR / "checkpoint-2").mkdir(parents=True)
    (staging / TRAINER_DIR / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(OutputError, match=r"differs in: the rows of the initialisation's batches \(processes × "
                                          r"--batch-size: 8 then, 4 now\)"):
        open_run_staging(out, run_key(cfg, values, "fp", 4), resume=True)
    assert open_run_staging(out, run_key(cfg, values, "fp", 8), resume=True)[1].name == "checkpoint-2"
    assert get_method("lora", EVA).initialises_from_data() and not get_method("lora", {"rank": 2}).initialises_from_data()
