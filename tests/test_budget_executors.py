"""``budget --executor local|ray``: the retention-budget search's candidates as executor jobs (adapt/executors.py)
score exactly as the inline search does, so the same point is chosen with the same numbers; a failing candidate is
named by ``JobsFailed`` while the others are kept in the work folder, and a rerun scores only what is missing.

On ``test_merge_budget``'s constructed trade-off (task arithmetic between a base that knows the source text and
a fine-tune on the target text). Marked slow where worker processes start: each imports torch and transformers.
The Ray test starts a local instance with 2 CPUs and skips without Ray (the ``deltawise[ray]`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adapt_util import tiny_lm  # noqa: F401
from test_merge_budget import _budget_cli, one_thread, tradeoff  # noqa: F401

from conftest import load_state
from deltawise.adapt.executors import JobsFailed
from deltawise.merge import load_recipe
from deltawise.merge.engine import MergeOptions
from deltawise.options import ExecutorOptions
from deltawise.search.budget import BudgetOptions, RetentionBudget, run_budget

GRID = (0.2, 0.6, 1.0)
BUDGET = 0.5


def _options(tradeoff, grid=GRID, **kw) -> BudgetOptions:
    return BudgetOptions([RetentionBudget(tradeoff["src"], BUDGET)], [tradeoff["tgt"]], grid={"lambda": list(grid)},
                         merge=MergeOptions(threads=1), **kw)


def _search(tradeoff, out: Path, grid=GRID, **kw):
    return run_budget(load_recipe(tradeoff["recipe"]), out, _options(tradeoff, grid, **kw))


def _numbers(result) -> dict:
    """What the search reports, as its JSON says it (the output path aside)."""
    found = json.loads(json.dumps(result.to_json()))
    return {k: found[k] for k in ("candidates", "pareto", "chosen", "chosen_params", "heldout", "splits", "baseline")}


@pytest.fixture(scope="module")
def inline(tradeoff, tmp_path_factory):
    out = tmp_path_factory.mktemp("inline") / "out"
    return out, _numbers(_search(tradeoff, out))


def test_the_inline_search_scores_every_candidate_and_leaves_no_work_folder(tradeoff, inline):
    out, numbers = inline
    assert [c["params"]["lambda"] for c in numbers["candidates"]] == list(GRID)
    assert numbers["chosen"] is not None and not (out.parent / "out.budget-work").exists()


@pytest.mark.slow
def test_local_executor_chooses_the_inline_point_with_the_same_numbers(tradeoff, inline, tmp_path):
    out, report = tmp_path / "out", tmp_path / "search.json"
    res = _budget_cli(tradeoff, out, BUDGET, GRID, "--report", str(report), "--executor", "local", "--jobs", "2")
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    found = json.loads(report.read_text())
    assert {k: found[k] for k in inline[1]} == inline[1]  # every score, bound and interval equal, not close
    merged, reference = load_state(out), load_state(inline[0])
    assert all((merged[k] == reference[k]).all() for k in reference)
    assert not (tmp_path / "out.budget-work").exists()


@pytest.mark.slow
def test_candidates_are_announced_as_they_finish(tradeoff, inline, tmp_path):
    notes, ticks = [], []
    result = _search(tradeoff, tmp_path / "out", executor=ExecutorOptions("local", jobs=2), note=notes.append,
                     progress=lambda *t: ticks.append(t))
    assert _numbers(result) == inline[1]
    assert "scoring 3 candidate(s) with the local executor" in notes
    assert sorted(n.split(":")[0] for n in notes if n.startswith("lambda=")) == ["lambda=0.2", "lambda=0.6", "lambda=1"]
    assert ticks == [("candidates", i, 3) for i in (1, 2, 3)]


@pytest.mark.slow
def test_a_failing_candidate_is_named_and_a_rerun_continues_from_the_cache(tradeoff, inline, tmp_path):
    out, work = tmp_path / "out", tmp_path / "out.budget-work"
    # lambda = 1e39 overflows float32: the merge engine refuses that candidate's NaN/inf weights
    with pytest.raises(JobsFailed, match=r"1 of 2 job\(s\) failed: lambda=1e\+39: DeltawiseError: "
                       r".*NaN/inf.*rerun the same command") as exc:
        _search(tradeoff, out, grid=(0.2, 1e39), executor=ExecutorOptions("local", jobs=2))
    assert exc.value.failures.keys() == {1} and not out.exists()
    kept = list((work / "candidates").glob("*.json"))
    assert len(kept) == 1 and not [p for p in (work / "candidates").iterdir() if p.is_dir()]  # no partial merge left
    assert json.loads(kept[0].read_text())["datasets"]  # lambda=0.2's scores

    notes = []
    result = _search(tradeoff, out, grid=GRID, note=notes.append)  # inline this time: the cache is the executor's
    assert "reusing 1 finished candidate(s): lambda=0.2" in notes  # read back, not merged and scored again
    assert _numbers(result) == inline[1]
    assert not work.exists()


@pytest.mark.slow
def test_ray_executor_chooses_the_inline_point_with_the_same_numbers(local_ray, tradeoff, inline, tmp_path):
    result = _search(tradeoff, tmp_path / "out", executor=ExecutorOptions("ray", job_cpus=1))
    assert _numbers(result) == inline[1]
