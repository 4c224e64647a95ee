"""Training with a forgetting budget (``train --retain``): the guard keeps a checkpoint within the budget
where plain training ends below it, the kept files are that step's weights, ``--interpolate`` writes a
feasible point reported on held-out items, and bad requests fail before training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from guard_util import StepWeights, guard_cfg, langs, scripted_guard  # noqa: F401
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltawise.adapt import TrainConfig, run_train
from deltawise.adapt.guard import GuardPoint, MonitorData, RetentionGuard
from deltawise.adapt.guarded import GuardRequest, guarded_train
from deltawise.cli import app
from deltawise.errors import InputError
from deltawise.options import GuardOptions
from deltawise.search.budget import RetentionBudget

_cfg = guard_cfg


def test_guard_keeps_a_checkpoint_within_the_budget_where_plain_training_ends_below_it(langs, tmp_path):
    weights = StepWeights()
    request = GuardRequest(retain=[RetentionBudget(langs["en"], 0.8)], targets=[langs["de_target"]],
                           options=GuardOptions(monitor_every=3))
    result = guarded_train(_cfg(langs, tmp_path / "out"), request, callbacks=[weights])
    points = result.state.points
    assert [p.step for p in points] == [3, 6, 9, 12]
    assert not points[-1].feasible and points[-1].retention["en"] < 0.8  # where training ends: below the budget
    kept = next(p for p in points if p.kept)
    assert kept.feasible and kept.retention_lower["en"] >= 0.8 and kept.step < 12
    assert kept.gain == max(p.gain for p in points if p.feasible)  # the best feasible step
    # the written files are exactly the kept step's weights
    written = load_file(tmp_path / "out" / "model.safetensors")
    for name, value in weights.at[kept.step].items():
        torch.testing.assert_close(written[name], value, rtol=0, atol=0)
    # the guard does not disturb training: a plain run ends where the guarded run's last step was
    plain = run_train(_cfg(langs, tmp_path / "plain"))
    assert plain.steps == 12
    final = load_file(tmp_path / "plain" / "model.safetensors")
    for name, value in weights.at[12].items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0)
    # the trajectory is in training_log.json; the choice and its held-out numbers in deltawise_guard.json
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    checks = [r for r in log if "guard" in r]
    assert [r["step"] for r in checks] == [3, 6, 9, 12]
    assert [r["guard"]["kept"] for r in checks] == [p.step == kept.step for p in points]
    assert all(set(r["guard"]) >= {"retention", "retention_ci", "gain", "gain_ci", "feasible"} for r in checks)
    record = json.loads((tmp_path / "out" / "deltawise_guard.json").read_text())
    assert record["budget_met"] and record["chosen"]["step"] == kept.step
    held = record["chosen"]["heldout"]
    lo, hi = held["retention_ci"]["en"]
    assert lo <= held["retention"]["en"] <= hi and held["gain"] > 0
    assert json.loads((tmp_path / "out" / "deltawise_train.json").read_text())["steps"] == 12
    # the report draws the trajectory from training_log.json and marks the kept step
    from deltawise.report.html import build_report

    runs = build_report([tmp_path / "out"], tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert [label for label, _, _ in runs.guarded] == ["out"]  # the train output, also listed as a training run
    assert [label for label, _ in runs.trainings] == ["out"]
    table = page[page.index('id="table-guard-'):]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 1 + 4 and table.count("&lt;-") == 1
    assert 'id="fig-guard-out"' in page and "<svg" in page


def test_interpolate_writes_a_feasible_point_reported_on_held_out_items(langs, tmp_path, monkeypatch):
    """Only the last step is checked and it is over budget; the WiSE-FT search finds base + λ(final − base)
    within it, refines around it, and the output is exactly that model. The search scores with the run's
    device and window. The record tells "no checked step met the budget" from "the written point does"."""
    from deltawise.adapt import interpolate as interpolation

    searched = []

    def run_budget(recipe, out, options):
        searched.append(options.eval)
        return real_run_budget(recipe, out, options)

    real_run_budget = interpolation.run_budget
    monkeypatch.setattr(interpolation, "run_budget", run_budget)
    weights = StepWeights()
    request = GuardRequest(retain=[RetentionBudget(langs["en"], 0.8)], options=GuardOptions(monitor_every=12, interpolate=True,
                                                                                         interpolate_refine=1))
    cfg = _cfg(langs, tmp_path / "out")
    result = guarded_train(cfg, request, callbacks=[weights])
    assert searched and all(e.device == "cpu" and e.max_length == cfg.max_length and e.trust_remote_code is False
                            for e in searched)
    assert not result.state.budget_met
    chosen = result.chosen
    assert chosen["segment"] == "wise-ft" and 0 < chosen["lambda"] < 1
    assert chosen["monitor"]["retention_lower"]["en"] >= 0.8  # feasible where it was chosen
    held = chosen["heldout"]
    assert set(held) >= {"retention", "retention_ci", "gain", "gain_ci", "within_budget"} and held["gain"] > 0
    record = json.loads((tmp_path / "out" / "deltawise_guard.json").read_text())
    assert record["chosen"]["lambda"] == chosen["lambda"] and "wise-ft" in record["interpolation"]
    assert record["budget_met"] is False and record["chosen"]["within_budget"] is True
    # one refinement round: the midpoints between the grid's best feasible λ and its grid neighbours
    candidates = record["interpolation"]["wise-ft"]["candidates"]
    grid = [0.2, 0.4, 0.6, 0.8, 1.0]
    on_grid = [c for c in candidates if c["params"]["lambda"] in grid and c["feasible"]]
    best = max(on_grid, key=lambda c: c["target_score"])["params"]["lambda"]
    at = grid.index(best)
    mids = {round((best + n) / 2, 9) for n in grid[max(0, at - 1) : at] + grid[at + 1 : at + 2]}
    assert {round(c["params"]["lambda"], 9) for c in candidates} - set(grid) == mids
    feasible = [c for c in candidates if c["feasible"]]
    assert chosen["lambda"] == max(feasible, key=lambda c: c["target_score"])["params"]["lambda"]
    base = load_file(langs["base"] / "model.safetensors")
    written = load_file(tmp_path / "out" / "model.safetensors")
    lam = chosen["lambda"]
    for name, final in weights.at[12].items():
        torch.testing.assert_close(written[name], base[name] + lam * (final - base[name]), rtol=1e-6, atol=1e-6)
    assert (tmp_path / "out" / "training_log.json").exists()


def test_after_training_scoring_takes_the_runs_device_and_remote_code(langs, tmp_path, monkeypatch):
    """BaM's rounds and --interpolate's searches score on the training device (not always the CPU) and with the run's
    --trust-remote-code, through one rule."""
    from deltawise.adapt import runtime
    from deltawise.adapt.guard import evaluation_options

    asked = []
    monkeypatch.setattr(runtime, "resolve_device", lambda name, n_processes=1: asked.append(name) or "cuda:1")
    cfg = dataclasses.replace(_cfg(langs, tmp_path / "out"), device="auto", trust_remote_code=True)
    options = evaluation_options(cfg, GuardRequest(retain=[RetentionBudget(langs["en"], 0.8)], eval_batch_size=3))
    assert asked == ["auto"] and options.device == "cuda:1" and options.trust_remote_code is True
    assert options.batch_size == 3 and options.max_length == cfg.max_length
    assert evaluation_options(cfg, GuardRequest(retain=[], eval_max_length=17)).max_length == 17


def test_stop_early_needs_both_retention_below_budget_and_no_gain_improvement():
    # over budget from check 2 but still improving: no stop; then two checks without a better gain: stop
    _, stops = scripted_guard([(0.95, 0.1), (0.85, 0.2), (0.8, 0.3), (0.8, 0.25), (0.7, 0.29)], patience=2)
    assert stops == [False, False, False, False, True]
    # gain stalls but retention stays within the budget: never stops
    _, stops = scripted_guard([(0.95, 0.3), (0.95, 0.2), (0.95, 0.1), (0.95, 0.0)], patience=1)
    assert stops == [False] * 4


def test_kept_point_is_the_best_feasible_gain_else_the_most_retentive():
    guard, _ = scripted_guard([(0.95, 0.1), (0.92, 0.4), (0.85, 0.9)], patience=5)
    assert guard._kept_point().step == 2
    guard, _ = scripted_guard([(0.8, 0.1), (0.85, 0.4), (0.7, 0.9)], patience=5)
    assert guard._kept_point() is None and guard._fallback().step == 2


def test_automatic_interval_keeps_checks_at_the_share_of_training_time():
    guard = RetentionGuard(MonitorData([], [], {}), None, Path("."), share=0.1)
    guard._check_cost = 2.0
    assert guard.interval(1.0) == 20  # 2 s per check, 10% of 20 steps of 1 s
    assert guard.interval(100.0) == 1
    guard.every = 7
    assert guard.interval(1.0) == 7
    point = GuardPoint(3, {"a": 1.0}, {"a": None}, {"a": 0.9}, 0.1, None, True, 0.5)
    assert point.to_json()["step"] == 3 and point.to_json()["guard"]["retention_lower"] == {"a": 0.9}


@pytest.mark.parametrize("minimum", ["0", "2.5", "-1", "x"])
def test_a_minimum_outside_the_range_is_refused_before_training(langs, tmp_path, minimum):
    res = CliRunner().invoke(app, ["train", str(langs["base"]), "--data", str(langs["de"]), "-o", str(tmp_path / "o"),
                                   "-m", "full", "--max-steps", "2", "--retain", f"{langs['en']}:{minimum}", "--quiet"])
    assert isinstance(res.exception, InputError) and "--retain" in str(res.exception)
    assert not (tmp_path / "o").exists()


def test_missing_files_and_orphan_options_are_clear_errors(langs, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match="nope.txt does not exist"):
        guarded_train(_cfg(langs, tmp_path / "o"), GuardRequest(retain=[RetentionBudget(missing, 0.9)]))
    with pytest.raises(InputError, match="--target .*nope.txt does not exist"):
        guarded_train(_cfg(langs, tmp_path / "o"), GuardRequest(retain=[RetentionBudget(langs["en"], 0.9)], targets=[missing]))
    with pytest.raises(InputError, match="is the training data"):
        guarded_train(_cfg(langs, tmp_path / "o"), GuardRequest(retain=[RetentionBudget(langs["de"], 0.9)]))
    res = CliRunner().invoke(app, ["train", str(langs["base"]), "--data", str(langs["de"]), "-o", str(tmp_path / "o"),
                                   "--interpolate", "--quiet"])
    assert isinstance(res.exception, InputError) and "need --retain" in str(res.exception)
    res = CliRunner().invoke(app, ["train", str(langs["base"]), "--data", str(langs["de"]), "-o", str(tmp_path / "o"),
                                   "--retain", f"{langs['en']}:0.9", "--interpolate-refine", "1", "--quiet"])
    assert isinstance(res.exception, InputError) and "add --interpolate" in str(res.exception)
    assert not (tmp_path / "o").exists()


def test_cli_prints_the_written_point_and_its_held_out_numbers(langs, tmp_path):
    res = CliRunner().invoke(app, ["train", str(langs["base"]), "--data", str(langs["de"]), "-o", str(tmp_path / "o"),
                                   "-m", "lora", "--max-steps", "4", "--lr", "1e-2", "--retain", f"{langs['en']}:0.5",
                                   "--monitor-every", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "guard: wrote the kept checkpoint (step" in res.output and "held out: retention en" in res.output
    assert (tmp_path / "o" / "adapter_config.json").exists()
    # the default target: a tenth of the training items, taken out of training and split monitor/held out
    record = json.loads((tmp_path / "o" / "deltawise_guard.json").read_text())
    target = record["splits"][1]
    assert target["selection_items"] + target["heldout_items"] == 3 and record["target_from_training"]
    assert record["chosen"]["heldout"]["retention"]["en"] > 0


def test_bam_writes_the_best_round_within_the_budget(langs, tmp_path):
    """BaM's checkpoints are its rounds: the later rounds forget too much, so the first round's merge is written."""
    from deltawise.adapt.bam import BamConfig
    from deltawise.adapt.bam_guard import guarded_bam

    tc = TrainConfig(model=langs["base"], data=langs["de"], output=tmp_path / "bam", method="full", max_steps=3, lr=3e-3,
                     schedule="constant", warmup=0, batch_size=8, progress=False)
    cfg = BamConfig(train=tc, branches=2, rounds=3)
    _, record = guarded_bam(cfg, GuardRequest(retain=[RetentionBudget(langs["en"], 0.8)], targets=[langs["de_target"]]))
    log = json.loads((tmp_path / "bam" / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3] and not log[-1]["guard"]["feasible"]
    kept = [r for r in log if r["guard"]["kept"]]
    assert len(kept) == 1 and kept[0]["guard"]["feasible"] and record["chosen"]["point"] == f"round {kept[0]['step']} of 3"
    written = load_file(tmp_path / "bam" / "model.safetensors")
    merged = load_file(cfg.work_dir / f"round_{kept[0]['step']}" / "merged" / "model.safetensors")
    assert written.keys() == merged.keys() and all(torch.equal(written[k], merged[k]) for k in merged)
    assert (tmp_path / "bam" / "bam.json").exists() and record["chosen"]["heldout"]["within_budget"] in (True, False)
    with pytest.raises(InputError, match="--branch-index"):
        guarded_bam(dataclasses.replace(cfg, branch_index=1), GuardRequest(retain=[RetentionBudget(langs["en"], 0.8)]))


def test_cli_resume_runs_interrupted_searches_of_an_adapter_without_retraining(langs, tmp_path, monkeypatch):
    """The command line's --resume reaches the searches: a LoRA run (its final point an adapter, folded into the
    base for the searches) interrupted as its search starts is refused without --resume and finished with it."""
    from deltawise.adapt import interpolate as interpolation
    from deltawise.adapt.guard_searches import interrupted_searches

    argv = ["train", str(langs["base"]), "--data", str(langs["de"]), "-o", str(tmp_path / "o"), "-m", "lora",
            "--max-steps", "4", "--lr", "1e-2", "--retain", f"{langs['en']}:0.5", "--monitor-every", "2",
            "--interpolate", "--quiet"]
    real = interpolation.search_segment
    with monkeypatch.context() as patch:
        patch.setattr(interpolation, "search_segment", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        assert CliRunner().invoke(app, argv).exit_code != 0
    assert interrupted_searches(tmp_path / "o") and (tmp_path / "o" / "adapter_config.json").exists()
    refused = CliRunner().invoke(app, argv)
    assert refused.exit_code != 0 and "--resume" in str(refused.exception or refused.output)
    searched = []
    monkeypatch.setattr(interpolation, "search_segment", lambda *a, **k: searched.append(1) or real(*a, **k))
    res = CliRunner().invoke(app, [*argv, "--resume"])
    assert res.exit_code == 0, res.output
    assert searched and "guard: wrote the" in res.output and not interrupted_searches(tmp_path / "o")
    assert "interpolation" in json.loads((tmp_path / "o" / "deltawise_guard.json").read_text())
