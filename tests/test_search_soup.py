"""Greedy soup: the accept/reject pass by hand on scalars, and end to end on tiny classifiers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from stats_util import dd  # noqa: F401
from typer.testing import CliRunner

from conftest import load_state, perturb
from deltawise.cli import app
from deltawise.search.scoring import Score
from deltawise.search.soup import greedy_select


def test_greedy_pass_by_hand():
    # score = -|theta - 0|: ingredients 1.0 (-1), -1.2 (-1.2), 3.0 (-3) in that order
    values = {"a": 1.0, "b": -1.2, "c": 3.0}
    load = lambda m: {"w": torch.tensor([values[m]])}  # noqa: E731
    score = lambda s: Score("loss", abs(float(s["w"])))  # noqa: E731
    ranked = sorted(((m, score(load(m))) for m in "cab"), key=lambda p: -p[1].score)
    steps, members, best = greedy_select(ranked, load, score)
    # b: (1 - 1.2)/2 = -0.1 -> 0.1 < 1: accepted; c: (1 - 1.2 + 3)/3 = 0.9333 > 0.1: rejected
    assert [(s.model, s.accepted, s.soup_size) for s in steps] == [("a", True, 1), ("b", True, 2), ("c", False, 2)]
    assert members == ["a", "b"] and best.value == pytest.approx(0.1)
    assert steps[2].candidate_value == pytest.approx(2.8 / 3)


def test_ties_are_rejected_unless_accepted():
    load = lambda m: {"w": torch.tensor([2.0])}  # noqa: E731  every ingredient identical: the soup never changes
    score = lambda s: Score("accuracy", 0.5)  # noqa: E731
    ranked = [("x", Score("accuracy", 0.5)), ("y", Score("accuracy", 0.5))]
    assert greedy_select(ranked, load, score)[1] == ["x"]
    assert greedy_select(ranked, load, score, accept_ties=True)[1] == ["x", "y"]


def _soup(models, data, out, *extra):
    result = CliRunner().invoke(app, ["soup", *map(str, models), "--data", str(data), "-o", str(out), *extra])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "soup.json").read_text())


@pytest.mark.parametrize("accept_ties", [False, True])
def test_soup_end_to_end_rejects_the_harmful_ingredient(dd, tmp_path, accept_ties):
    copy = shutil.copytree(dd["cls1"], tmp_path / "copy")  # identical to cls1: averaging with it changes nothing
    noisy = perturb(dd["cls1"], tmp_path / "noisy", seed=9, scale=3.0)  # ruins the classifier
    out = tmp_path / "soup"
    text, log = _soup([noisy, copy, dd["cls1"]], dd["labelled"], out, "--metric", "loss",
                      *(["--accept-ties"] if accept_ties else []))
    steps = log["steps"]
    # copy and cls1 tie as ingredients and keep their given order; the noisy model scores worst
    assert [s["model"] for s in steps] == [str(copy), str(dd["cls1"]), str(noisy)]
    assert [s["accepted"] for s in steps] == [True, accept_ties, False]
    assert steps[1]["candidate_value"] == steps[0]["ingredient_value"]  # (a + a) / 2 == a exactly
    assert log["members"] == [str(copy)] + ([str(dd["cls1"])] if accept_ties else [])
    soup, ref = load_state(out), load_state(dd["cls1"])
    assert all(torch.equal(soup[k], ref[k]) for k in ref)
    assert "rejected" in text and (out / "deltawise_merge.json").exists()


def _antithetic(src: Path, root: Path, scale: float) -> tuple[Path, Path]:
    """src + delta and src - delta for one seeded Gaussian delta: their average is src."""
    from safetensors.torch import save_file

    state = load_state(src)
    gen = torch.Generator().manual_seed(5)
    delta = {k: scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    out = []
    for sign, name in ((1, "plus"), (-1, "minus")):
        folder = shutil.copytree(src, root / name)
        save_file({k: v + sign * delta[k] for k, v in state.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        out.append(folder)
    return out[0], out[1]


def test_soup_accepts_an_ingredient_that_cancels_the_others_error(dd, tmp_path):
    from deltawise.data.tasks import load_data
    from deltawise.search.scoring import score_model
    from deltawise.eval.classify import classify
    from deltawise.eval.models import load_model

    # labels = the base classifier's own predictions: it scores 1.0; +delta and -delta both score less,
    # and their average is the base again
    base = load_model(dd["cls"], "classification")
    items = load_data(dd["labelled"]).items
    data = tmp_path / "self.jsonl"
    data.write_text("".join(json.dumps({"text": i.text, "label": o.predicted}) + "\n"
                            for i, o in zip(items, classify(base, items, max_length=64))))
    plus, minus = _antithetic(dd["cls"], tmp_path, 0.5)
    out = tmp_path / "soup"
    _, log = _soup([plus, minus], data, out, "--quiet", "--heldout-fraction", "0")  # every item, in-sample
    alone = [s["ingredient_value"] for s in log["steps"]]
    assert max(alone) < 1.0
    assert [s["accepted"] for s in log["steps"]] == [True, True] and log["value"] == 1.0
    soup, a, b = load_state(out), load_state(Path(log["members"][0])), load_state(Path(log["members"][1]))
    for k in soup:
        assert torch.equal(soup[k], (a[k] + b[k]) / 2)
    got = score_model(load_model(out, "classification"), load_data(data), "accuracy", max_length=256)
    assert got.value == log["value"]


def test_soup_chooses_on_the_selection_split_and_reports_on_held_out_items(dd, tmp_path):
    from deltawise.data.read import load_items
    from deltawise.search.splits import split_items

    out = tmp_path / "soup"
    text, log = _soup([dd["cls1"], dd["cls2"]], dd["labelled"], out, "--split-seed", "2")
    selection, heldout = split_items(load_items(dd["labelled"]), 0.5, 2, 0)
    assert log["split"] == {"file": str(dd["labelled"]), "heldout_file": None, "selection_items": len(selection),
                            "heldout_items": len(heldout)}
    held = log["heldout"]
    assert held["items"] == len(heldout) and held["metric"] == "accuracy"
    assert held["best_ingredient"]["model"] == log["steps"][0]["model"]
    # the held-out numbers are what eval reports for the written soup and that ingredient on those items
    from deltawise.eval.runner import EvalOptions, evaluate
    from deltawise.search.splits import write_items

    held_file = write_items(tmp_path / "held.jsonl", heldout)
    opts = EvalOptions(max_length=256)
    soup_acc = evaluate(str(out), [held_file], [], opts).datasets[0].value
    best_acc = evaluate(held["best_ingredient"]["model"], [held_file], [], opts).datasets[0].value
    assert held["soup"] == pytest.approx(soup_acc) and held["best_ingredient"]["value"] == pytest.approx(best_acc)
    assert held["ratio_ci"] is None or held["ratio_ci"][0] <= held["ratio_to_best_ingredient"] <= held["ratio_ci"][1]
    assert "held out" in text and "in-sample" not in text


def test_an_in_sample_soup_says_so(dd, tmp_path):
    text, log = _soup([dd["cls1"], dd["cls2"]], dd["labelled"], tmp_path / "soup", "--heldout-fraction", "0")
    assert log["heldout"] is None and any("in-sample" in w for w in log["warnings"]) and "in-sample" in text
