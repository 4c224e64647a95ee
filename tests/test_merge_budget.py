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
from search_util import fit, hand_splits, one_thread, save, source_base, versus_base, write_texts  # noqa: F401
from typer.testing import CliRunner

from conftest import load_state
from deltawise.cli import app
from deltawise.errors import InputError, RecipeError
from deltawise.search.budget import RetentionBudget, pareto_front, search_grid
from deltawise.merge.recipe import parse_recipe

GRID = (0.2, 0.6, 1.0, 3.0, 4.0)


@pytest.fixture(scope="module")
def tradeoff(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    """``base`` fits the source docs; ``ft`` is base after two steps on the target docs (the same
    words in reverse order), so moving towards ft gains target and loses source perplexity."""
    root = tmp_path_factory.mktemp("budget")
    files = write_texts(root)
    model, tok = source_base(tiny_lm, files, root / "base")
    fit(model, batch_of(tiny_lm, data=files["tgt_txt"]), 2, 3e-3)
    save(model, tok, root / "ft")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(root / "base"),
                                      "models": [{"model": str(root / "ft")}]}))
    return {**files, "base": root / "base", "ft": root / "ft", "recipe": recipe, "root": root}


def _hand_merge(tradeoff, lam: float, folder: Path) -> Path:
    """base + lam·(ft − base), merged with torch."""
    base, ft = load_state(tradeoff["base"]), load_state(tradeoff["ft"])
    model = base_model(tradeoff["base"])
    model.load_state_dict({n: base[n] + lam * (ft[n] - base[n]) for n in base}, strict=False)
    model.save_pretrained(folder)
    shutil.copy(tradeoff["base"] / "tokenizer.json", folder)
    shutil.copy(tradeoff["base"] / "tokenizer_config.json", folder)
    return folder


def _budget_cli(tradeoff, out: Path, budget: float, grid: tuple[float, ...], *extra: str):
    args = ["budget", str(tradeoff["recipe"]), str(out), "--retain", f"{tradeoff['src']}:{budget}", "--target",
            str(tradeoff["tgt"]), "--search-param", "lambda=" + ",".join(map(str, grid)), "--threads", "1", "--quiet", *extra]
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


def test_budget_chooses_on_the_selection_split_by_lower_bound_and_reports_on_held_out_items(tradeoff, tmp_path):
    files = hand_splits(tradeoff, tmp_path / "split")
    hand = {lam: versus_base(tradeoff["base"], _hand_merge(tradeoff, lam, tmp_path / f"hand-{lam}"), files, 0) for lam in GRID}
    ret = [hand[lam]["src"].ratio for lam in GRID]
    lower = [hand[lam]["src"].ratio_lower for lam in GRID]
    tgt = [hand[lam]["tgt"].ratio for lam in GRID]
    # the constructed trade-off: up to lambda 1, retention falls and the target score rises
    assert ret[0] > ret[1] > ret[2] and tgt[0] < tgt[1] < tgt[2]
    assert all(lo < r for lo, r in zip(lower, ret))  # a lower bound, below the point estimate
    budget = (lower[0] + lower[1]) / 2 if lower[0] > lower[1] else lower[0]
    expected_front = [i for i in range(len(GRID))
                      if not any(ret[j] >= ret[i] and tgt[j] >= tgt[i] and (ret[j] > ret[i] or tgt[j] > tgt[i])
                                 for j in range(len(GRID)))]

    out, report = tmp_path / "out", tmp_path / "search.json"
    res = _budget_cli(tradeoff, out, budget, GRID, "--report", str(report))
    assert res.exit_code == 0, res.output
    found = json.loads(report.read_text())
    assert [c["params"]["lambda"] for c in found["candidates"]] == list(GRID)
    # scored on the selection split, exactly as the hand evaluation of those items (the bootstrap draws too)
    assert [c["retention"]["src"] for c in found["candidates"]] == pytest.approx(ret, rel=1e-4)
    assert [c["retention_lower"]["src"] for c in found["candidates"]] == pytest.approx(lower, rel=1e-4)
    assert [c["target"]["tgt"] for c in found["candidates"]] == pytest.approx(tgt, rel=1e-4)
    assert found["pareto"] == expected_front
    # feasible when the LOWER bound clears the budget, not the point estimate
    assert [c["feasible"] for c in found["candidates"]] == [lo >= budget for lo in lower]
    feasible = [i for i, lo in enumerate(lower) if lo >= budget]
    assert found["chosen"] == max(feasible, key=lambda i: tgt[i])
    lam = GRID[found["chosen"]]
    merged, base, ft = load_state(out), load_state(tradeoff["base"]), load_state(tradeoff["ft"])
    for name in base:
        torch.testing.assert_close(merged[name], base[name] + lam * (ft[name] - base[name]), atol=1e-6, rtol=1e-6)
    # reported on the held-out split: the written model evaluated on items the search never scored
    held = versus_base(tradeoff["base"], out, files, 1)
    assert found["heldout"]["retention"]["src"] == pytest.approx(held["src"].ratio, rel=1e-6)
    assert found["heldout"]["target"]["tgt"] == pytest.approx(held["tgt"].ratio, rel=1e-6)
    assert found["heldout"]["retention_ci"]["src"] == pytest.approx(list(held["src"].ratio_ci), rel=1e-6)
    for name in ("src", "tgt"):
        selection_ids = {json.loads(line)["id"] for line in files[name][0].read_text().splitlines()}
        heldout_ids = {json.loads(line)["id"] for line in files[name][1].read_text().splitlines()}
        assert selection_ids and heldout_ids and not selection_ids & heldout_ids
    assert [s["selection_items"] + s["heldout_items"] for s in found["splits"]] == [len(DOCS), len(DOCS)]
    assert "held out: retention src" in res.output
    assert not [p for p in tmp_path.iterdir() if ".budget-" in p.name]  # candidates and splits were deleted


def test_a_seeded_rerun_makes_the_same_split_and_the_same_choice(tradeoff, tmp_path):
    runs = []
    for i, seed in enumerate(("0", "0", "5")):
        report = tmp_path / f"search-{i}.json"
        res = _budget_cli(tradeoff, tmp_path / f"out-{i}", 0.5, (0.2, 1.0), "--report", str(report), "--split-seed", seed)
        assert res.exit_code == 0, res.output
        runs.append(json.loads(report.read_text()))
    assert runs[0]["candidates"] == runs[1]["candidates"] and runs[0]["chosen"] == runs[1]["chosen"]
    assert runs[0]["heldout"] == runs[1]["heldout"]
    assert runs[2]["candidates"][0]["values"] != runs[0]["candidates"][0]["values"]  # another seed, another cut


def test_held_out_files_given_by_the_user_are_used_and_an_in_sample_one_is_refused(tradeoff, tmp_path):
    files = hand_splits(tradeoff, tmp_path / "split", seed=3)
    args = ["budget", str(tradeoff["recipe"]), str(tmp_path / "out"), "--retain", f"{files['src'][0]}:0.1",
            "--target", str(files["tgt"][0]), "--heldout-retain", str(files["src"][1]), "--heldout-target",
            str(files["tgt"][1]), "--search-param", "lambda=0.2,0.6", "--threads", "1", "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    found = json.loads((tmp_path / "out" / "deltawise_budget.json").read_text())
    assert found["splits"][0]["heldout_file"] == str(files["src"][1])
    held = versus_base(tradeoff["base"], tmp_path / "out", files, 1)
    assert found["heldout"]["retention"]["src"] == pytest.approx(held["src"].ratio, rel=1e-6)
    same = [*args[:4], f"{files['src'][0]}:0.1", "--target", str(files["tgt"][0]), "--heldout-retain", str(files["src"][0]),
            "--heldout-target", str(files["tgt"][1]), "--search-param", "lambda=0.2", "--threads", "1", "--quiet"]
    res = CliRunner().invoke(app, [*same[:2], str(tmp_path / "out2"), *same[3:]])
    assert res.exit_code == 1 and "in-sample" in str(res.exception)


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
    assert "chose lambda = 0.2 on the selection split" in res.output
    merged, base, ft = load_state(out), load_state(tradeoff["base"]), load_state(tradeoff["ft"])
    torch.testing.assert_close(merged["lm_head.weight"],
                               base["lm_head.weight"] + 0.2 * (ft["lm_head.weight"] - base["lm_head.weight"]))


def test_the_budget_table_shows_its_bracketed_labels():
    """Rich reads "[...]" as markup: the lower-bound labels must reach the terminal."""
    import io

    from rich.console import Console

    from deltawise.search.budget import BudgetResult, Candidate, budget_table

    result = BudgetResult(method="task_arithmetic", grid={"lambda": [0.5]}, budgets={"en": 0.98}, baseline="b",
                          baseline_values={}, chosen=0, intervals={"level": 0.95},
                          candidates=[Candidate({"lambda": 0.5}, {"en": 1.0}, {"de": 1.2}, {}, retention_lower={"en": 0.99},
                                                feasible=True)])
    buf = io.StringIO()
    Console(file=buf, width=200).print(budget_table(result))
    text = buf.getvalue()
    assert "retention en [lower bound ≥ 0.98]" in text and "[lower bound]: one-sided 95%" in text and "1.0000 [0.9900]" in text
