"""Retention-budget merging: on a constructed trade-off (a base that knows the source text, a
fine-tune on a target text; task arithmetic's lambda trades one for the other) the search picks the
largest lambda within budget, its Pareto front matches a hand computation, and an infeasible
budget writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from adapt_util import DOCS, base_model, batch_of, tiny_lm  # noqa: F401
from typer.testing import CliRunner

from conftest import load_state
from deltawise.cli import app
from deltawise.errors import InputError, RecipeError
from deltawise.eval.runner import EvalOptions, evaluate
from deltawise.search.budget import RetentionBudget, pareto_front, search_grid
from deltawise.merge.recipe import parse_recipe

GRID = (0.2, 0.6, 1.0, 3.0, 4.0)


def _fit(model, batch, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """32-wide models: more torch threads only contend for the shared cores (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tradeoff(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    """``base`` fits the source docs; ``ft`` is base after two steps on the target docs (the same
    words in reverse order), so moving towards ft gains target and loses source perplexity."""
    from deltawise.adapt.train import load_tokenizer

    root = tmp_path_factory.mktemp("budget")
    target_docs = [" ".join(reversed(d.split())) for d in DOCS]
    files = {"src_txt": root / "src.txt", "tgt_txt": root / "tgt.txt", "src": root / "src.jsonl", "tgt": root / "tgt.jsonl"}
    files["src_txt"].write_text("\n%\n".join(DOCS) + "\n")
    files["tgt_txt"].write_text("\n%\n".join(target_docs) + "\n")
    files["src"].write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    files["tgt"].write_text("".join(json.dumps({"text": d}) + "\n" for d in target_docs))
    torch.manual_seed(0)
    model, tok = base_model(tiny_lm["model"]), load_tokenizer(tiny_lm["model"])
    for name, data, steps, lr in (("base", files["src_txt"], 15, 1e-2), ("ft", files["tgt_txt"], 2, 3e-3)):
        _fit(model, batch_of(tiny_lm, data=data), steps, lr)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(root / "base"),
                                      "models": [{"model": str(root / "ft")}]}))
    return {**files, "base": root / "base", "ft": root / "ft", "recipe": recipe, "root": root}


def _hand_scores(tradeoff, lam: float, folder: Path) -> tuple[float, float]:
    """(retention, target) of base + lam·(ft − base), merged with torch and evaluated directly."""
    base, ft = load_state(tradeoff["base"]), load_state(tradeoff["ft"])
    model = base_model(tradeoff["base"])
    model.load_state_dict({n: base[n] + lam * (ft[n] - base[n]) for n in base}, strict=False)
    model.save_pretrained(folder)
    shutil.copy(tradeoff["base"] / "tokenizer.json", folder)
    shutil.copy(tradeoff["base"] / "tokenizer_config.json", folder)
    opts = EvalOptions()
    ref = {d.name: d.value for d in evaluate(str(tradeoff["base"]), [tradeoff["src"]], [tradeoff["tgt"]], opts).datasets}
    got = {d.name: d.value for d in evaluate(str(folder), [tradeoff["src"]], [tradeoff["tgt"]], opts).datasets}
    return ref["src"] / got["src"], ref["tgt"] / got["tgt"]  # perplexity: ratio base / model


def _budget_cli(tradeoff, out: Path, budget: float, grid: tuple[float, ...], *extra: str):
    args = ["merge", str(tradeoff["recipe"]), str(out), "--retain", f"{tradeoff['src']}:{budget}",
            "--target", str(tradeoff["tgt"]),
            "--search-param", "lambda=" + ",".join(map(str, grid)), "--threads", "1", "--quiet", *extra]
    return CliRunner().invoke(app, args)


def test_pareto_front_is_the_non_dominated_set():
    points = [(1.0, 1.0), (2.0, 0.5), (0.5, 2.0), (0.9, 0.9), (1.0, 1.0), (2.0, 0.4)]
    assert pareto_front(points) == [0, 1, 2, 4]  # equal points do not dominate each other


def test_search_grid_defaults_and_refusals():
    ta = parse_recipe({"merge_method": "task_arithmetic", "base_model": "b", "models": ["m"]})
    assert search_grid(ta, {}) == {"lambda": [0.2, 0.4, 0.6, 0.8, 1.0]}
    assert (search_grid(parse_recipe({"merge_method": "slerp", "base_model": "b", "models": ["m"]}), {})
            == {"t": [0.2, 0.4, 0.6, 0.8, 1.0]})
    ties = parse_recipe({"merge_method": "ties", "base_model": "b", "models": ["m"]})
    assert search_grid(ties, {"density": [0.2, 0.5], "lambda": [1]}) == {"density": [0.2, 0.5], "lambda": [1.0]}
    with pytest.raises(RecipeError, match="no lambda or t"):
        search_grid(parse_recipe({"merge_method": "linear", "models": ["a", "b"]}), {})
    with pytest.raises(RecipeError, match=r"density=1.5 is outside \[0.0, 1.0\]"):
        search_grid(ties, {"density": [1.5]})
    with pytest.raises(RecipeError, match="t: not a parameter of ties"):
        search_grid(ties, {"t": [0.5]})
    assert RetentionBudget.parse("c:/data/en.jsonl:0.98") == RetentionBudget(Path("c:/data/en.jsonl"), 0.98)
    with pytest.raises(InputError, match="SOURCE:MIN_RETENTION"):
        RetentionBudget.parse("en.jsonl")


def test_budget_search_picks_the_largest_lambda_within_budget_and_reports_the_pareto_front(tradeoff, tmp_path):
    hand = {lam: _hand_scores(tradeoff, lam, tmp_path / f"hand-{lam}") for lam in GRID}
    ret = [hand[lam][0] for lam in GRID]
    tgt = [hand[lam][1] for lam in GRID]
    # the constructed trade-off: up to lambda 1, retention falls and the target score rises
    assert ret[0] > ret[1] > ret[2] and tgt[0] < tgt[1] < tgt[2]
    budget = (ret[1] + ret[2]) / 2  # 0.2 and 0.6 are within budget, 1.0 is not
    expected_front = [i for i in range(len(GRID))
                      if not any(ret[j] >= ret[i] and tgt[j] >= tgt[i] and (ret[j] > ret[i] or tgt[j] > tgt[i])
                                 for j in range(len(GRID)))]
    assert len(expected_front) < len(GRID)  # too large a lambda is worse on both counts: not every point is on the front

    out, report = tmp_path / "out", tmp_path / "search.json"
    res = _budget_cli(tradeoff, out, budget, GRID, "--report", str(report))
    assert res.exit_code == 0, res.output
    found = json.loads(report.read_text())
    assert [c["params"]["lambda"] for c in found["candidates"]] == list(GRID)
    assert [c["retention"]["src"] for c in found["candidates"]] == pytest.approx(ret, rel=1e-4)
    assert [c["target"]["tgt"] for c in found["candidates"]] == pytest.approx(tgt, rel=1e-4)
    assert found["pareto"] == expected_front
    assert [c["feasible"] for c in found["candidates"]] == [r >= budget for r in ret]
    assert found["chosen_params"] == {"lambda": 0.6}
    merged, base, ft = load_state(out), load_state(tradeoff["base"]), load_state(tradeoff["ft"])
    for name in base:
        torch.testing.assert_close(merged[name], base[name] + 0.6 * (ft[name] - base[name]), atol=1e-6, rtol=1e-6)
    assert not [p for p in tmp_path.iterdir() if ".budget-" in p.name]  # candidates were deleted


def test_infeasible_budget_writes_nothing_unless_the_most_retentive_point_is_asked_for(tradeoff, tmp_path):
    out, report = tmp_path / "out", tmp_path / "search.json"
    res = _budget_cli(tradeoff, out, 1.5, (0.2, 0.6), "--report", str(report))
    assert res.exit_code == 1
    assert "no searched point meets the retention budget" in str(res.exception)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    found = json.loads(report.read_text())
    assert found["chosen"] is None and len(found["candidates"]) == 2 and not any(c["feasible"] for c in found["candidates"])

    res = _budget_cli(tradeoff, out, 1.5, (0.2, 0.6), "--most-retentive")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "deltawise_budget.json").read_text())["chosen_params"] == {"lambda": 0.2}
    merged, base, ft = load_state(out), load_state(tradeoff["base"]), load_state(tradeoff["ft"])
    torch.testing.assert_close(merged["lm_head.weight"],
                               base["lm_head.weight"] + 0.2 * (ft["lm_head.weight"] - base["lm_head.weight"]))
