"""``deltawise repair`` on a planted loss: a delta = a useful part (two steps on the target text) + a
harmful part (a large rank-1 change of the MLP matrices along a direction the base does not have,
i.e. an intruder dimension) that destroys retention. Repair must meet the budget on the held-out
split, keep most of the useful gain, and never report on the items it chose on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapt_util import DOCS, base_model, batch_of, tiny_lm  # noqa: F401
from search_util import fit, hand_splits, one_thread, save, source_base, versus_base, write_texts  # noqa: F401
from typer.testing import CliRunner

from conftest import load_state
from deltawise.analyze.intruders import intruder_dimensions, intruder_directions
from deltawise.architecture import architecture_for
from deltawise.cli import app
from deltawise.errors import InputError
from deltawise.search.budget import RetentionBudget
from deltawise.search.repair import RepairOptions, run_repair
from deltawise.search.repair_edits import DeltaEdits, tensor_group

HARM = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate_proj.weight")


def _harmful(w0: torch.Tensor, strength: float) -> torch.Tensor:
    """A rank-1 change whose left vector is orthogonal to every column of ``w0`` (an intruder by construction:
    |cos| 0 with all of ``w0``'s left singular vectors), larger than ``w0``'s top singular value."""
    g = torch.Generator().manual_seed(w0.shape[0])
    u = torch.randn(w0.shape[0], generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(w0.double())
    u = u - q @ (q.T @ u)
    v = torch.randn(w0.shape[1], generator=g, dtype=torch.float64)
    top = torch.linalg.matrix_norm(w0.double(), ord=2)
    return (strength * top * torch.outer(u / u.norm(), v / v.norm())).to(w0.dtype)


@pytest.fixture(scope="module")
def planted(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repair")
    files = write_texts(root)
    model, tok = source_base(tiny_lm, files, root / "base")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, batch_of(tiny_lm, data=files["tgt_txt"]), 1, 2e-3)
    save(model, tok, root / "useful")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in HARM:
                p.add_(_harmful(base[name], 4.0))
    save(model, tok, root / "harmed")
    return {"root": root, "src": files["src"], "tgt": files["tgt"], "base": root / "base", "useful": root / "useful",
            "harmed": root / "harmed"}


def _options(planted, budget: float, **kw) -> RepairOptions:
    return RepairOptions([RetentionBudget(planted["src"], budget)], [planted["tgt"]], **kw)


BUDGET = 0.8


def test_intruder_directions_find_the_planted_direction_and_match_the_count(planted):
    base, harmed = load_state(planted["base"]), load_state(planted["harmed"])
    for name in HARM:
        found = intruder_directions(base[name], harmed[name])
        assert found.shape[1] == intruder_dimensions(base[name], harmed[name]).count >= 1
        u = torch.linalg.svd(_harmful(base[name], 4.0).double())[0][:, 0]  # the planted left vector
        assert (found.T @ u).abs().max() > 0.95  # the useful part moves it a little
        torch.testing.assert_close(found.T @ found, torch.eye(found.shape[1], dtype=torch.float64), atol=1e-8, rtol=0)
    assert intruder_directions(base[HARM[0]], base[HARM[0]]).shape[1] == 0  # a matrix is no intruder of itself


def test_groups_come_from_the_architecture_roles():
    roles = architecture_for({"model_type": "llama", "num_hidden_layers": 4})
    assert tensor_group("model.embed_tokens.weight", roles, 4) == "embeddings"
    assert tensor_group("lm_head.weight", roles, 4) == "embeddings"
    assert tensor_group("model.layers.1.self_attn.q_proj.weight", roles, 4) == "attention_early"
    assert tensor_group("model.layers.2.self_attn.o_proj.bias", roles, 4) == "attention_late"  # a bias goes with its weight
    assert tensor_group("model.layers.0.mlp.down_proj.weight", roles, 4) == "mlp_early"
    assert tensor_group("model.layers.3.mlp.up_proj.weight", roles, 4) == "mlp_late"
    assert tensor_group("model.layers.3.input_layernorm.weight", roles, 4) == "other"
    assert tensor_group("model.norm.weight", roles, 4) == "other"


def test_an_edit_is_base_plus_the_scaled_delta_minus_its_intruder_part(planted):
    base, harmed = base_model(planted["base"]), base_model(planted["harmed"])
    w0, wf = load_state(planted["base"]), load_state(planted["harmed"])
    edits = DeltaEdits.between(base, harmed)
    point = {**edits.identity(), "scale": 0.5, "intruders": 0.75, "mlp_late": 0.5}
    name = "model.layers.1.mlp.up_proj.weight"
    u = intruder_directions(w0[name], wf[name])
    d = (wf[name] - w0[name]).double()
    hand = w0[name].double() + 0.5 * 0.5 * (d - 0.75 * u @ (u.T @ d))
    torch.testing.assert_close(edits.tensor(name, point).double(), hand, atol=1e-6, rtol=1e-6)
    attn = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(edits.tensor(attn, point), w0[attn] + 0.5 * (wf[attn] - w0[attn]), atol=1e-6, rtol=1e-6)
    edits.apply(point)
    torch.testing.assert_close(dict(base.named_parameters())[name].detach().double(), hand, atol=1e-6, rtol=1e-6)
    edits.apply(edits.identity())  # the identity point is the fine-tuned model
    for n, p in base.named_parameters():
        torch.testing.assert_close(p.detach(), wf[n], atol=1e-6, rtol=1e-6)


def test_repair_recovers_a_planted_loss_within_budget_and_keeps_most_of_the_gain(planted, tmp_path):
    files = hand_splits(planted, tmp_path / "split")
    # the constructed case: the useful delta alone meets the budget, the harmed one does not
    useful_held = versus_base(planted["base"], planted["useful"], files, 1)
    harmed_held = versus_base(planted["base"], planted["harmed"], files, 1)
    assert useful_held["src"].ratio > BUDGET + 0.05 and harmed_held["src"].ratio < BUDGET - 0.1
    assert useful_held["tgt"].ratio > 1.3

    out = tmp_path / "out"
    result = run_repair(str(planted["harmed"]), str(planted["base"]), out, _options(planted, BUDGET))
    chosen = result.candidates[result.chosen]
    assert chosen.feasible and chosen.params["intruders"] > 0  # the planted harm is an intruder: its removal is chosen
    held = result.heldout
    assert held["within_budget"] and held["retention"]["src"] >= BUDGET
    # most of the useful gain is kept: at least 60% of the useful delta's log target ratio, on held-out items
    import math

    assert math.log(held["target"]["tgt"]) >= 0.6 * math.log(useful_held["tgt"].ratio)
    # the planted direction is gone from the written model: u^T W is back near the base's (which is 0 along u)
    written, harmed, w0 = load_state(out), load_state(planted["harmed"]), load_state(planted["base"])
    for name in HARM:
        u = torch.linalg.svd(_harmful(w0[name], 4.0).double())[0][:, 0]
        assert (u @ written[name].double()).norm() < 0.05 * (u @ harmed[name].double()).norm()
    report = json.loads((out / "deltawise_repair.json").read_text())
    assert report["schema"] == "deltawise.repair/1" and report["chosen"] == result.chosen
    assert set(report["intruder_dimensions"]) >= set(HARM)
    assert report["pareto"] and all(report["candidates"][i]["pareto"] for i in report["pareto"])


def test_repair_chooses_on_the_selection_split_and_reports_on_held_out_items_only(planted, tmp_path):
    files = hand_splits(planted, tmp_path / "split")
    out = tmp_path / "out"
    result = run_repair(str(planted["harmed"]), str(planted["base"]), out, _options(planted, BUDGET))
    # the first point is the delta as given, scored on the selection split exactly as a hand evaluation of it
    first = versus_base(planted["base"], planted["harmed"], files, 0)
    assert result.candidates[0].params == {**result.candidates[0].params, "scale": 1.0, "intruders": 0.0}
    assert result.candidates[0].retention["src"] == pytest.approx(first["src"].ratio, rel=1e-4)
    assert result.candidates[0].retention_lower["src"] == pytest.approx(first["src"].ratio_lower, rel=1e-4)
    assert result.candidates[0].target["tgt"] == pytest.approx(first["tgt"].ratio, rel=1e-4)
    # the report: the written model on the held-out items, which the selection never saw
    held = versus_base(planted["base"], out, files, 1)
    assert result.heldout["retention"]["src"] == pytest.approx(held["src"].ratio, rel=1e-6)
    assert result.heldout["target"]["tgt"] == pytest.approx(held["tgt"].ratio, rel=1e-6)
    assert result.heldout["retention_ci"]["src"] == pytest.approx(list(held["src"].ratio_ci), rel=1e-6)
    for name in ("src", "tgt"):
        ids = [{json.loads(line)["id"] for line in f.read_text().splitlines()} for f in files[name]]
        assert ids[0] and ids[1] and not ids[0] & ids[1]
    # feasibility is the lower bound's, and the choice is the best feasible target among all points
    feasible = [c for c in result.candidates if c.feasible]
    assert all(min(c.retention_lower.values()) >= BUDGET for c in feasible)
    assert all(min(c.retention_lower.values()) < BUDGET for c in result.candidates if not c.feasible)
    assert result.candidates[result.chosen].target_score == max(c.target_score for c in feasible)
    assert not [p for p in tmp_path.iterdir() if ".repair-" in p.name]


def test_repair_cli_prints_the_front_and_the_held_out_numbers_and_an_impossible_budget_writes_nothing(planted, tmp_path):
    args = ["repair", str(planted["harmed"]), "--base", str(planted["base"]), "--retain", f"{planted['src']}:{BUDGET}",
            "--target", str(planted["tgt"]), "--scales", "0.5,1", "--group-scales", "0", "-o"]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "out"), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "held out: retention src" in res.output and "Pareto" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["heldout"]["within_budget"]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "none"), "--retain", f"{planted['src']}:1.5",
                                   "--report", str(tmp_path / "none.json")])
    assert res.exit_code != 0 and "no repair point meets the retention budget" in str(res.exception)
    assert not (tmp_path / "none").exists()
    assert json.loads((tmp_path / "none.json").read_text())["chosen"] is None


def test_bad_inputs_are_refused_with_clear_errors(planted, tmp_path):
    with pytest.raises(InputError, match="--retain"):
        run_repair(str(planted["harmed"]), str(planted["base"]), tmp_path / "o", RepairOptions([], [planted["tgt"]]))
    with pytest.raises(InputError, match="--target"):
        run_repair(str(planted["harmed"]), str(planted["base"]), tmp_path / "o",
                   RepairOptions([RetentionBudget(planted["src"], 0.9)], []))
    with pytest.raises(InputError, match=r"--scales takes values in \[0, 1\]"):
        run_repair(str(planted["harmed"]), str(planted["base"]), tmp_path / "o", _options(planted, 0.9, scales=(0.5, 2.0)))
    with pytest.raises(InputError, match="nothing to repair"):
        run_repair(str(planted["base"]), str(planted["base"]), tmp_path / "o", _options(planted, 0.9))
    from tiny_models import save_tiny_llama

    other = save_tiny_llama(tmp_path / "other", DOCS, hidden=16, layers=2, vocab=96)
    with pytest.raises(InputError, match="same parameters"):
        run_repair(str(other), str(planted["base"]), tmp_path / "o", _options(planted, 0.9))
    from deltawise.errors import OutputError

    with pytest.raises(OutputError):
        run_repair(str(planted["harmed"]), str(planted["base"]), planted["base"] / "inside", _options(planted, 0.9))
    cls = tmp_path / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": d, "label": "a" if i % 2 else "b"}) + "\n" for i, d in enumerate(DOCS)))
    with pytest.raises(InputError, match="not classifiers"):
        run_repair(str(planted["harmed"]), str(planted["base"]), tmp_path / "o",
                   RepairOptions([RetentionBudget(cls, 0.9)], [planted["tgt"]]))
    res = CliRunner().invoke(app, ["repair", str(planted["harmed"]), "--base", str(planted["base"]), "--retain",
                                   f"{planted['src']}:0.9", "--target", str(planted["tgt"]), "--scales", "a,b", "-o",
                                   str(tmp_path / "o")])
    assert res.exit_code != 0 and "comma-separated numbers" in str(res.exception)
    assert not (tmp_path / "o").exists()


def test_a_delta_folder_repairs_like_the_fine_tuned_model_it_was_extracted_from(planted, tmp_path):
    res = CliRunner().invoke(app, ["extract", str(planted["harmed"]), "--base", str(planted["base"]), "-o",
                                   str(tmp_path / "delta"), "--quiet"])
    assert res.exit_code == 0, res.output
    kw = dict(scales=(1.0,), intruder_levels=(1.0,), group_scales=(1.0,))
    from_delta = run_repair(str(tmp_path / "delta"), str(planted["base"]), tmp_path / "a", _options(planted, BUDGET, **kw))
    from_model = run_repair(str(planted["harmed"]), str(planted["base"]), tmp_path / "b", _options(planted, BUDGET, **kw))
    assert [c.params for c in from_delta.candidates] == [c.params for c in from_model.candidates]
    for a, b in zip(from_delta.candidates, from_model.candidates):
        assert a.retention["src"] == pytest.approx(b.retention["src"], rel=1e-5)
        assert a.target["tgt"] == pytest.approx(b.target["tgt"], rel=1e-5)


def test_the_planned_evaluation_count_is_what_the_first_round_scores(planted, tmp_path):
    ticks = []
    opts = _options(planted, BUDGET, progress=lambda stage, done, total: ticks.append((done, total)))
    result = run_repair(str(planted["harmed"]), str(planted["base"]), tmp_path / "out", opts)
    assert ticks[-1] == (len(result.candidates), len(result.candidates))
    # 1 (the delta as given) + 2 intruder levels + 3 new scales + 2 new factors for each of the groups the delta touches
    assert len(result.candidates) == 1 + 2 + 3 + 2 * len(result.groups)


def test_most_retentive_writes_the_point_with_the_highest_retention_when_none_meets_the_budget(planted, tmp_path):
    opts = _options(planted, 1.5, most_retentive=True, scales=(0.5, 1.0), group_scales=(1.0,), intruder_levels=(1.0,))
    result = run_repair(str(planted["harmed"]), str(planted["base"]), tmp_path / "out", opts)
    assert not any(c.feasible for c in result.candidates)
    best = max(result.candidates, key=lambda c: c.retention_min)
    assert result.candidates[result.chosen] is best
    assert not result.heldout["within_budget"] and (tmp_path / "out" / "deltawise_repair.json").is_file()
