"""``train --retain ... --save-every N --resume``: a guarded run interrupted after a checkpoint and resumed keeps the
same checkpoint, trajectory, patience counter and record as the uninterrupted run; a resume that changes the guard
(or drops it) is refused, naming what changed."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from guard_util import guard_cfg, langs, scripted_guard  # noqa: F401
from safetensors.torch import load_file
from transformers import TrainerCallback

from ddp_worker import Interrupted, StopAt
from deltawise.adapt import run_train
from deltawise.adapt.guard import MonitorData, RetentionGuard
from deltawise.adapt.guard_resume import GUARD_KEPT, GUARD_STATE
from deltawise.adapt.guarded import GuardRequest, guarded_train
from deltawise.errors import OutputError
from deltawise.io.output import staging_folder
from deltawise.options import GuardOptions
from deltawise.search.scoring import as_result
from deltawise.search.budget import RetentionBudget

STEPS, EVERY, SAVE_EVERY, STOP_AT = 12, 3, 6, 8


def _request(langs, minimum: float = 0.8, **options) -> GuardRequest:  # noqa: F811
    return GuardRequest(retain=[RetentionBudget(langs["en"], minimum)], targets=[langs["de_target"]],
                        options=GuardOptions(monitor_every=EVERY, **options))


def _points(points) -> list[dict]:
    return [{k: v for k, v in asdict(p).items() if k != "seconds"} for p in points]  # all but the wall time


def _interrupt(langs, out: Path, **options) -> Path:  # noqa: F811
    with pytest.raises(Interrupted):
        guarded_train(guard_cfg(langs, out, STEPS, save_every=SAVE_EVERY), _request(langs, **options),
                      callbacks=[StopAt(STOP_AT)])
    checkpoint = staging_folder(out) / "_trainer" / f"checkpoint-{SAVE_EVERY}"
    assert not out.exists() and (checkpoint / GUARD_STATE).is_file()
    return checkpoint


def test_resumed_guarded_run_equals_the_uninterrupted_run(langs, tmp_path):  # noqa: F811
    options = {"stop_early": True}  # on, though the gain keeps improving here: the patience test is below
    whole = guarded_train(guard_cfg(langs, tmp_path / "whole", STEPS, save_every=SAVE_EVERY), _request(langs, **options))
    checkpoint = _interrupt(langs, tmp_path / "resumed", **options)
    saved = json.loads((checkpoint / GUARD_STATE).read_text())
    assert [p["step"] for p in saved["points"]] == [3, 6]
    kept = next(p for p in whole.state.points if p.kept)
    # the case that needs the saved kept weights: the uninterrupted run keeps a step before the interruption
    assert kept.step <= SAVE_EVERY and kept.feasible and (checkpoint / GUARD_KEPT).is_file()
    resumed = guarded_train(guard_cfg(langs, tmp_path / "resumed", STEPS, save_every=SAVE_EVERY, resume=True),
                            _request(langs, **options))
    assert _points(resumed.state.points) == _points(whole.state.points)
    assert resumed.state.stopped_early_at == whole.state.stopped_early_at and resumed.train.steps == whole.train.steps
    assert not whole.state.points[-1].feasible  # where training ends: over the budget
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads((tmp_path / name / "training_log.json").read_text()) for name in ("whole", "resumed")]
    for log in logs:
        for r in log:
            r.get("guard", {}).pop("seconds", None)
    keys = ("step", "loss", "learning_rate", "grad_norm", "guard")
    assert [[r.get(k) for k in keys] for r in logs[1]] == [[r.get(k) for k in keys] for r in logs[0]]
    records = [json.loads((tmp_path / name / "deltawise_guard.json").read_text()) for name in ("whole", "resumed")]
    for part in ("chosen", "kept", "budget_met", "stopped_early_at"):
        assert records[1][part] == records[0][part], part
    assert records[1]["monitor"]["checks"] == records[0]["monitor"]["checks"]
    assert json.loads((tmp_path / "resumed" / "deltawise_train.json").read_text())["resumed_from_step"] == SAVE_EVERY


def test_a_resume_that_changes_or_drops_the_guard_is_refused(langs, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    _interrupt(langs, out)
    with pytest.raises(OutputError, match="the --retain guard's budgets"):
        guarded_train(guard_cfg(langs, out, STEPS, save_every=SAVE_EVERY, resume=True), _request(langs, minimum=0.9))
    with pytest.raises(OutputError, match="differs in: .*--retain"):
        run_train(guard_cfg(langs, out, STEPS, save_every=SAVE_EVERY, resume=True))
    assert (staging_folder(out) / "_trainer" / f"checkpoint-{SAVE_EVERY}" / GUARD_STATE).is_file()  # still resumable


def test_the_patience_counter_and_kept_point_survive_a_checkpoint(tmp_path):
    """Checks 1-3 in one guard, saved; checks 4-5 in a new guard loaded from the save: it stops at check 5 and keeps
    check 1, as one guard that made all five checks does."""
    numbers = [(0.95, 0.1), (0.85, 0.3), (0.8, 0.2), (0.8, 0.25), (0.7, 0.29)]
    whole, stops = scripted_guard(numbers, patience=3)
    assert stops == [False] * 4 + [True] and whole._kept_point().step == 1
    first, _ = scripted_guard(numbers[:3], patience=3)
    first.baseline = first.baseline_heldout = as_result("base", [])
    first.save_checkpoint(tmp_path)
    second = RetentionGuard(MonitorData([], ["src"], {"src": 0.9}), None, Path("."), stop_early=True, patience=3)
    second.load_checkpoint(tmp_path)
    second, later = scripted_guard(numbers[3:], patience=3, guard=second, first_step=4)
    assert later == stops[3:] and second.state.stopped_early_at == whole.state.stopped_early_at == 5
    assert _points(second.state.points) == _points(whole.state.points) and second._kept_point().step == 1
    assert second.kept_weights == {}  # the kept snapshot (empty here) came back from the checkpoint


def _interpolating(langs, minimum: float = 0.8) -> GuardRequest:  # noqa: F811
    return GuardRequest(retain=[RetentionBudget(langs["en"], minimum)], targets=[langs["de_target"]],
                        options=GuardOptions(monitor_every=EVERY, interpolate=True))


def _interrupt_searches(langs, out: Path, monkeypatch, at_call: int) -> None:  # noqa: F811
    """A guarded --interpolate run that trains to the end and is interrupted as its ``at_call``-th search starts."""
    from deltawise.adapt import interpolate as interpolation

    real, calls = interpolation.search_segment, []

    def search_segment(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise Interrupted
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(interpolation, "search_segment", search_segment)
        with pytest.raises(Interrupted):
            guarded_train(guard_cfg(langs, out), _interpolating(langs))


def test_a_run_interrupted_in_its_searches_finishes_with_resume_without_retraining(langs, tmp_path, monkeypatch):  # noqa: F811
    """Killed after training, in the second segment's search: the output is the kept checkpoint with a record that
    says the searches did not finish, and the work folder holds the final weights. A rerun without --resume is
    refused (the training is not thrown away), as is a resume with another guard; --resume then searches without
    training and writes what the uninterrupted run writes."""
    import deltawise.adapt.guarded as guarded_module
    from deltawise.adapt.guard_searches import FINAL, TRAINED, interrupted_searches, work_folder

    whole = guarded_train(guard_cfg(langs, tmp_path / "whole"), _interpolating(langs))
    assert "kept-final" in whole.record["interpolation"]  # two segments: the interruption falls between them
    out = tmp_path / "out"
    _interrupt_searches(langs, out, monkeypatch, at_call=2)
    work = work_folder(out)
    assert interrupted_searches(out) and (work / FINAL).is_dir() and (work / TRAINED).is_file()
    pending = json.loads((out / "deltawise_guard.json").read_text())
    assert pending["interpolation"].startswith("not finished") and pending["chosen"]["point"] == "kept checkpoint"
    kept = load_file(out / "model.safetensors")
    with pytest.raises(OutputError, match="interrupted in its --interpolate searches.*--resume"):
        guarded_train(guard_cfg(langs, out), _interpolating(langs))
    with pytest.raises(OutputError, match="the --retain guard's budgets"):
        guarded_train(guard_cfg(langs, out, resume=True), _interpolating(langs, minimum=0.9))
    assert interrupted_searches(out)  # a refused resume keeps the finished training
    monkeypatch.setattr(guarded_module, "run_train", lambda *a, **k: pytest.fail("a resume of the searches retrained"))
    resumed = guarded_train(guard_cfg(langs, out, resume=True), _interpolating(langs))
    assert not work.exists() and not interrupted_searches(out)
    assert _points(resumed.state.points) == _points(whole.state.points) and resumed.train.steps == whole.train.steps
    records = [json.loads((tmp_path / name / "deltawise_guard.json").read_text()) for name in ("whole", "out")]
    assert records[1]["chosen"] == records[0]["chosen"] and records[1]["chosen"]["point"] != "kept checkpoint"
    for segment in ("wise-ft", "kept-final"):
        scored = [[(c["params"], c["target_score"], c["retention"]) for c in r["interpolation"][segment]["candidates"]]
                  for r in records]
        assert scored[1] == scored[0], segment
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(kept[k], b[k]) for k in kept)  # the interpolated point replaced the kept checkpoint
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no work or lock folder left


def test_overwrite_trains_again_after_interrupted_searches(langs, tmp_path, monkeypatch):  # noqa: F811
    from deltawise.adapt.guard_searches import interrupted_searches

    out = tmp_path / "out"
    _interrupt_searches(langs, out, monkeypatch, at_call=1)
    trained = []
    import deltawise.adapt.guarded as guarded_module

    real = guarded_module.run_train
    monkeypatch.setattr(guarded_module, "run_train", lambda *a, **k: trained.append(1) or real(*a, **k))
    result = guarded_train(guard_cfg(langs, out, overwrite=True), _interpolating(langs))
    assert trained == [1] and not interrupted_searches(out) and "interpolation" in result.record
    assert json.loads((out / "deltawise_guard.json").read_text())["interpolation"] == result.record["interpolation"]
