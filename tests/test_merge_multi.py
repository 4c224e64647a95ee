"""Multi-stage recipes (mergekit-multi's format): one command runs every stage, equal to running the
stages by hand (and to mergekit-multi); finished stages are verified and not redone; a changed or
damaged stage is redone with the stages that use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import load_state
from test_mergekit_compat import assert_same_tensors

from deltawise.cli import app
from deltawise.errors import RecipeError
from deltawise.merge import merge as deltawise_merge
from deltawise.merge.engine import MergeOptions
from deltawise.merge.multi import load_stages, run_stages


def _stages(f: dict[str, Path]) -> list[dict]:
    """``soup`` = linear(ft1, ft2); ``ta`` = task arithmetic of soup and ft3 on the base; the final
    (unnamed) = slerp between ta and soup."""
    return [
        {"name": "soup", "merge_method": "linear",
         "models": [{"model": str(f["ft1"]), "parameters": {"weight": 0.6}},
                    {"model": str(f["ft2"]), "parameters": {"weight": 0.4}}]},
        {"merge_method": "slerp", "base_model": "ta", "models": [{"model": "ta"}, {"model": "soup"}], "parameters": {"t": 0.3}},
        {"name": "ta", "merge_method": "task_arithmetic", "base_model": str(f["base"]),
         "models": [{"model": "soup", "parameters": {"weight": 0.5}}, {"model": str(f["ft3"]), "parameters": {"weight": 0.5}}]},
    ]


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _by_hand(f: dict[str, Path], root: Path) -> dict[str, torch.Tensor]:
    soup, final, ta = _stages(f)
    sub = {"soup": str(root / "soup"), "ta": str(root / "ta")}
    root.mkdir()

    def fill(doc: dict) -> dict:
        doc = {k: v for k, v in doc.items() if k != "name"}
        text = yaml.safe_dump(doc)
        for name, folder in sub.items():
            for key in ("model", "base_model"):
                text = text.replace(f"{key}: {name}\n", f"{key}: {folder}\n")
        return yaml.safe_load(text)

    deltawise_merge(fill(soup), root / "soup")
    deltawise_merge(fill(ta), root / "ta")
    deltawise_merge(fill(final), root / "final")
    return load_state(root / "final")


def test_stages_equal_the_stages_run_by_hand(llama_family, tmp_path):
    recipe = _write(tmp_path / "multi.yaml", _stages(llama_family))
    order = [s.name for s in load_stages(recipe, tmp_path / "work")]
    assert order == ["soup", "ta", None]  # dependency order, the unnamed stage last
    seen = []
    run_stages(recipe, tmp_path / "out", tmp_path / "work", MergeOptions(),
               on_stage=lambda s, t, done: seen.append((s.name, done)))
    assert seen == [("soup", False), ("ta", False), (None, False)]
    ours = load_state(tmp_path / "out")
    hand = _by_hand(llama_family, tmp_path / "hand")
    assert all(torch.equal(ours[k], hand[k]) for k in hand) and set(ours) == set(hand)
    ft1 = load_state(llama_family["ft1"])
    assert max(float((ours[k] - ft1[k]).abs().max()) for k in ours) > 1e-4


def test_rerun_skips_finished_stages_and_redoes_changed_or_damaged_ones(llama_family, tmp_path):
    docs = _stages(llama_family)
    recipe = _write(tmp_path / "multi.yaml", docs)
    def run() -> list[tuple]:
        return _run(recipe, tmp_path)

    assert run() == [("soup", False), ("ta", False), (None, False)]
    stamp = (tmp_path / "work" / "soup" / "model.safetensors").stat().st_mtime_ns
    assert run() == [("soup", True), ("ta", True), (None, True)]
    assert (tmp_path / "work" / "soup" / "model.safetensors").stat().st_mtime_ns == stamp
    # a damaged intermediate is merged again, and so is everything after it (its fingerprint changed)
    shard = tmp_path / "work" / "ta" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run() == [("soup", True), ("ta", False), (None, True)]  # ta's bytes are the same again: final is current
    # an edited stage recipe is merged again with the stages that use it
    docs[0]["models"][0]["parameters"]["weight"] = 0.7
    _write(recipe, docs)
    assert run() == [("soup", False), ("ta", False), (None, False)]


def _run(recipe: Path, root: Path) -> list[tuple]:
    seen: list[tuple] = []
    run_stages(recipe, root / "out", root / "work", MergeOptions(overwrite=True),
               on_stage=lambda s, t, done: seen.append((s.name, done)))
    return seen


def test_cli_runs_a_multi_stage_file(llama_family, tmp_path):
    recipe = _write(tmp_path / "multi.yaml", _stages(llama_family))
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.stages" / "soup" / "model.safetensors").exists()
    assert_same_tensors(_by_hand(llama_family, tmp_path / "hand"), load_state(tmp_path / "out"), atol=0, rtol=0)


@pytest.mark.parametrize("docs, message", [
    ([{"name": "a", "merge_method": "linear", "models": ["b"]}, {"name": "b", "merge_method": "linear", "models": ["a"]},
      {"merge_method": "linear", "models": ["a"]}], "cycle"),
    ([{"name": "a", "merge_method": "linear", "models": ["x"]}, {"name": "a", "merge_method": "linear", "models": ["y"]}],
     "two recipes are named 'a'"),
    ([{"merge_method": "linear", "models": ["x"]}, {"merge_method": "linear", "models": ["y"]}], "more than one unnamed"),
    ([{"name": "a", "merge_method": "linear", "models": ["x"]}, {"name": "b", "merge_method": "linear", "models": ["a"]},
      {"name": "c", "merge_method": "linear", "models": ["b"]}, {"name": "d", "merge_method": "linear", "models": ["c"]}],
     None),
])
def test_stage_structure_problems(tmp_path, docs, message):
    recipe = _write(tmp_path / "multi.yaml", docs)
    if message is None:  # without an unnamed recipe, the last document is the final merge
        assert [s.name for s in load_stages(recipe, tmp_path / "w")] == ["a", "b", "c", None]
        return
    with pytest.raises(RecipeError, match=message):
        load_stages(recipe, tmp_path / "w")


def test_matches_mergekit_multi(llama_family, tmp_path):
    """The same file through mergekit-multi (its own command, in process)."""
    from click.testing import CliRunner as ClickRunner
    from mergekit.scripts.multimerge import main as mergekit_multi

    from test_mergekit_compat import load_folder

    docs = _stages(llama_family)
    recipe = _write(tmp_path / "multi.yaml", docs)
    res = ClickRunner().invoke(mergekit_multi, [str(recipe), "--out-path", str(tmp_path / "theirs"), "-I", str(tmp_path / "mk"),
                                               "--no-copy-tokenizer", "--no-lazy-unpickle"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run_stages(recipe, tmp_path / "ours", tmp_path / "work", MergeOptions())
    assert_same_tensors(load_folder(tmp_path / "theirs"), load_state(tmp_path / "ours"))


def test_dry_run_lists_the_stages_and_writes_nothing(llama_family, tmp_path):
    import json

    recipe = _write(tmp_path / "multi.yaml", _stages(llama_family))
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--dry-run", "--work-dir", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    stages = json.loads(res.stdout)
    assert [s["stage"] for s in stages] == ["soup", "ta", "final"] and stages[1]["uses"] == ["soup"]
    assert stages[1]["recipe"]["models"][0]["model"] == str((tmp_path / "w" / "soup").resolve())
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()
