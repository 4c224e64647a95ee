"""``deltawise train`` with our own methods writes a canonical delta folder (docs/deltas.md):
``deltawise apply`` gives the trained model's logits, a task_arithmetic recipe listing the folder
gives the same weights, ``compress`` takes it, LIFT's delta is sparse and small, and a new
classification head is a ``full`` entry that ``apply`` adds to a base without one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapt_util import base_model, batch_of, tiny_lm, train_cfg  # noqa: F401
from conftest import load_state

from deltawise.adapt import run_train
from deltawise.adapt.methods.base import DeltaMethod
from deltawise.delta.apply import apply_delta
from deltawise.delta.compress import compress_delta
from deltawise.delta.extract import extract_delta
from deltawise.delta.store import DeltaFile
from deltawise.io.reader import ModelReader
from deltawise.merge import merge

KINDS = {"hft": "dense", "lift": "sparse", "sorsa": "lowrank"}
# each method's parameters, as Python values and as command-line flags (hft takes only ``ratio``)
PARAMS = {"hft": {}, "lift": {"rank": 2, "filter_rank": 4}, "sorsa": {"rank": 2, "targets": ["q_proj", "v_proj"]}}
FLAGS = {"hft": [], "lift": ["--rank", "2", "--filter-rank", "4"], "sorsa": ["--rank", "2", "--targets", "q_proj,v_proj"]}


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()


def _train(tiny_lm, out: Path, method: str, task: str = "causal_lm", cli: bool = False) -> torch.Tensor:
    """Train 2 steps (with ``deltawise train`` when ``cli``); return the logits of the trained
    (unmerged) model, taken when it is saved."""
    data = tiny_lm["cls"] if task == "classification" else tiny_lm["data"]
    batch = batch_of(tiny_lm, task, data)
    seen: dict[str, torch.Tensor] = {}
    save = DeltaMethod.save

    def spy(self, model, folder, base=None):
        seen["logits"] = _logits(model, batch)
        save(self, model, folder, base)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DeltaMethod, "save", spy)
        if cli:
            _cli("train", tiny_lm["model"], "--data", data, "-o", out, "--method", method, "--task", task, "--max-steps", "2",
                 "--batch-size", "4", "--lr", "1e-2", *FLAGS[method])
        else:
            run_train(train_cfg(tiny_lm, out, method, PARAMS[method], max_steps=2, batch_size=4, task=task, data=data))
    return seen["logits"]


def _cli(*args) -> None:
    from typer.testing import CliRunner

    from deltawise.cli import app

    res = CliRunner().invoke(app, [*map(str, args), "--quiet"])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def runs(tiny_lm, tmp_path_factory):
    """``runs(method)``: (``deltawise train`` output, trained logits, ``deltawise apply`` output),
    made once per module."""
    cache: dict[str, tuple[Path, torch.Tensor, Path]] = {}

    def get(method: str):
        if method not in cache:
            root = tmp_path_factory.mktemp(method)
            trained = _train(tiny_lm, root / "run", method, cli=True)
            _cli("apply", root / "run", "--base", tiny_lm["model"], "-o", root / "applied")
            cache[method] = (root / "run", trained, root / "applied")
        return cache[method]

    return get


def test_delta_and_run_record_the_resolved_method_parameters(runs):
    """The given values (as text from the command line) typed, and every other parameter at its default."""
    out, _, _ = runs("sorsa")
    expected = {"rank": 2, "alpha": None, "gamma": 4e-4, "targets": ["q_proj", "v_proj"]}
    assert json.loads((out / "delta.json").read_text())["parameters"] == expected
    run = json.loads((out / "deltawise_train.json").read_text())
    assert run["method_params"] == expected
    assert run["config"]["method_params"] == {"rank": 2, "targets": "q_proj,v_proj"}  # as given


def _shard_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("delta-*.safetensors"))


@pytest.mark.parametrize("method", list(KINDS))
def test_apply_of_the_trained_delta_gives_the_trained_models_logits(method, runs, tiny_lm):
    out, trained, applied = runs(method)
    header = json.loads((out / "delta.json").read_text())
    assert header["format"] == "deltawise-delta" and header["method"] == method
    assert header["base"]["fingerprint"] == ModelReader(tiny_lm["model"]).fingerprint()
    assert Path(header["base"]["ref"]) == Path(tiny_lm["model"]).resolve()
    assert {e["kind"] for e in header["tensors"].values()} == {KINDS[method]}
    assert not (out / "deltawise_delta.json").exists() and (out / "tokenizer.json").is_file()
    batch = batch_of(tiny_lm)
    got = _logits(base_model(applied), batch)
    assert not torch.allclose(got, _logits(base_model(tiny_lm["model"]), batch), atol=1e-4)  # training moved it
    torch.testing.assert_close(got, trained, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", list(KINDS))
def test_task_arithmetic_recipe_and_compress_take_the_trained_delta(method, runs, tiny_lm, tmp_path):
    out, _, applied = runs(method)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tiny_lm["model"]),
              "models": [{"model": str(out), "parameters": {"weight": 1.0}}], "parameters": {"lambda": 1.0}}
    merge(recipe, tmp_path / "merged")
    want = load_state(applied)
    got = load_state(tmp_path / "merged")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=name)
    # compress keeps every entry at density 1 (exact values), so applying it gives the same weights
    compress_delta(str(out), tmp_path / "topk", method="topk", density=1.0)
    apply_delta(str(tmp_path / "topk"), str(tiny_lm["model"]), tmp_path / "back")
    back = load_state(tmp_path / "back")
    for name in want:
        torch.testing.assert_close(back[name], want[name], rtol=1e-6, atol=1e-6, msg=name)


def test_lift_delta_is_sparse_and_much_smaller_than_a_dense_delta(runs, tiny_lm, tmp_path):
    out, _, applied = runs("lift")
    extract_delta(str(applied), str(tiny_lm["model"]), tmp_path / "dense", dtype="float32")
    assert set(DeltaFile(tmp_path / "dense").names()) == set(DeltaFile(out).names())  # the same tensors changed
    assert _shard_bytes(out) * 4 < _shard_bytes(tmp_path / "dense")  # 5x at rank 2 on this tiny model


def test_new_classification_head_is_a_full_entry_that_apply_adds(tiny_lm, tmp_path):
    trained = _train(tiny_lm, tmp_path / "run", "lift", task="classification")
    delta = DeltaFile(tmp_path / "run")
    assert delta.kind("score.weight") == "full" and "score.weight" not in ModelReader(tiny_lm["model"])
    apply_delta(str(tmp_path / "run"), str(tiny_lm["model"]), tmp_path / "applied")
    assert torch.equal(load_state(tmp_path / "applied")["score.weight"], delta.get("score.weight").values)
    batch = batch_of(tiny_lm, "classification", tiny_lm["cls"])
    got = _logits(base_model(tmp_path / "applied", "classification", 2), batch)
    torch.testing.assert_close(got, trained, atol=2e-5, rtol=1e-4)
    compress_delta(str(tmp_path / "run"), tmp_path / "c", method="compeft", density=0.5)
    kept = DeltaFile(tmp_path / "c")
    assert kept.kind("score.weight") == "full" and torch.equal(kept.get("score.weight").values, delta.get("score.weight").values)
