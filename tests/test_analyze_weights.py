"""Streaming weight analysis: norms, sign conflicts, TALL masks, the CLI, and interpolation curves."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from deltawise.analyze.interpolate import InterpolationOptions, interpolation_curve, loss_barrier
from deltawise.analyze.overlap import mask_overlap, sign_conflict, tall_masks
from deltawise.analyze.weights import WeightsOptions, analyze_weights
from deltawise.cli import app
from conftest import load_state, tree_digest
from eval_util import save_tiny_lm


def test_sign_conflicts_counted_per_entry():
    a = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0])
    b = torch.tensor([1.0, 1.0, -3.0, -2.0, 0.0])
    c = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    sc = sign_conflict([a, b, c])
    assert (sc.entries, sc.conflicts, sc.overlapping) == (5, 2, 3)  # entries 1 and 3 disagree; 0, 1, 3 overlap
    assert sc.rate == pytest.approx(0.4) and sc.rate_among_overlap == pytest.approx(2 / 3)


def test_tall_masks_selfish_and_catastrophic():
    t1 = torch.tensor([1.0, 0.0, 1.0, 0.1])
    t2 = torch.tensor([0.0, 0.0, 1.0, -0.1])
    masks = tall_masks([t1, t2], lam=0.4)
    # entry 0: only task 1 moved it (selfish); entry 1: nobody (catastrophic); entry 2: both
    # (|1| > 0.4*|1|); entry 3: tau_MTL = 0, so |0.1| > 0.4*|0.1| holds for both
    assert masks[0].tolist() == [True, False, True, True]
    assert masks[1].tolist() == [False, False, True, True]
    mo = mask_overlap([t1, t2], lam=0.4)
    assert (mo.selfish, mo.catastrophic) == (1, 1)
    assert mo.jaccard()[0][1] == pytest.approx(2 / 3)
    # a single task keeps every non-zero entry: tau_MTL = tau_1, so |tau_MTL - tau_1| = 0 < |tau_1|
    assert tall_masks([t1], lam=0.4)[0].tolist() == [True, False, True, True]


def test_analyze_weights_cli_on_llama_family(llama_family, tmp_path):
    before = {k: tree_digest(v) for k, v in llama_family.items()}
    out = tmp_path / "weights.json"
    r = CliRunner().invoke(app, ["analyze", "weights", str(llama_family["base"]), str(llama_family["ft1"]),
                                 str(llama_family["ft2"]), "-o", str(out), "--k", "4", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["schema"] == "deltawise.analyze.weights/1" and data["settings"]["k"] == 4
    base, ft1 = load_state(llama_family["base"]), load_state(llama_family["ft1"])
    q = next(t for t in data["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    want = torch.linalg.vector_norm(ft1[q["name"]] - base[q["name"]]).item()
    assert q["deltas"][0]["norm"] == pytest.approx(want, rel=1e-5)
    assert q["deltas"][0]["relative"] == pytest.approx(want / torch.linalg.vector_norm(base[q["name"]]).item(), rel=1e-5)
    assert len(q["intruders"][0]["similarities"]) == 4
    assert q["sign_conflict"]["rate"] == pytest.approx(0.5, abs=0.05)  # independent Gaussian noise: half disagree
    embed = next(t for t in data["tensors"] if "embed" in t["name"])
    assert embed["intruders"] is None
    assert {m["model"] for m in data["summary"]["models"]} == {"ft1", "ft2"}
    assert before == {k: tree_digest(v) for k, v in llama_family.items()}


def test_fast_intruders_equal_the_exact_svds_on_a_model_family(llama_family):
    models = [str(llama_family["ft1"]), str(llama_family["ft2"])]
    results = {m: analyze_weights(str(llama_family["base"]), models, WeightsOptions(k=4, intruder_method=m)).model_dump()
               for m in ("fast", "exact")}
    fast, exact = results["fast"], results["exact"]
    assert fast["summary"]["models"] == exact["summary"]["models"]  # intruder counts and matrices, norms
    searched = [(tf, te) for tf, te in zip(fast["tensors"], exact["tensors"]) if te["intruders"]]
    assert searched
    for tf, te in searched:
        for i_f, ie in zip(tf["intruders"], te["intruders"]):
            assert i_f["count"] == ie["count"]
            assert i_f["similarities"] == pytest.approx(ie["similarities"], abs=1e-6)
            assert i_f["singular_values"] == pytest.approx(ie["singular_values"], rel=1e-9)
            assert i_f["base_singular_values"] == pytest.approx(ie["base_singular_values"], rel=1e-9)


def test_analyze_weights_refuses_mismatched_models(llama_family, make_folder):
    from deltawise.errors import InputError

    other = make_folder("other", {"model.embed_tokens.weight": torch.zeros(3, 3)})
    with pytest.raises(InputError, match="do not match the base"):
        analyze_weights(str(llama_family["base"]), [str(other)])


def test_loss_barrier_formula():
    lams = [0.0, 0.5, 1.0]
    assert loss_barrier(lams, [1.0, 2.0, 3.0]) == (0.0, 0.0)  # on the chord: no barrier
    assert loss_barrier(lams, [1.0, 3.0, 1.0]) == (2.0, 0.5)


@pytest.fixture(scope="module")
def lm_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmc")
    text = root / "t.txt"
    text.write_text("one fish two fish\n\nred fish blue fish\n\nthis one has a little star\n")
    return save_tiny_lm(root / "a", seed=0), save_tiny_lm(root / "b", seed=1), text


def test_interpolation_between_identical_models_is_flat(lm_pair):
    a, _, text = lm_pair
    curve = interpolation_curve(str(a), str(a), text, InterpolationOptions(points=5))
    assert curve.lambdas == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert max(curve.loss) - min(curve.loss) == 0.0
    assert curve.barrier == 0.0


def test_interpolation_between_different_models(lm_pair, tmp_path):
    a, b, text = lm_pair
    out = tmp_path / "curve.json"
    r = CliRunner().invoke(app, ["analyze", "interpolate", str(a), str(b), "--data", str(text), "--points", "3",
                                 "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["kind"] == "interpolation" and len(data["loss"]) == 3
    from deltawise.eval.models import load_model
    from deltawise.eval.perplexity import perplexity

    for endpoint, loss in ((a, data["loss"][0]), (b, data["loss"][-1])):  # endpoints are the models themselves
        lm = load_model(endpoint)
        docs = [lm.tokenizer(t.strip())["input_ids"] for t in text.read_text().split("\n\n")]
        assert loss == pytest.approx(perplexity(lm.model, docs, max_length=64, stride=32).mean_nll, rel=1e-5)
    assert abs(data["loss"][1] - data["loss"][0]) > 1e-6 and abs(data["loss"][1] - data["loss"][2]) > 1e-6
