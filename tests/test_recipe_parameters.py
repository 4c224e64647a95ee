"""Recipe parameters a method does not take: lenient where mergekit is (a parameter of another
method is ignored with a warning naming it), strict where it helps (a likely typo of a parameter
name is an error with a suggestion), and ``--strict`` / ``strict=True`` turns every warning into
an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_mergekit_compat import assert_same_tensors, entry, run_mergekit, write_recipe

from deltawise.errors import RecipeError
from deltawise.merge import build_plan, merge, parse_recipe
from conftest import load_state


def model_stock(family, **model_parameters) -> dict:
    return {
        "merge_method": "model_stock",
        "base_model": str(family["base"]),
        "models": [entry(family["ft1"], **model_parameters), entry(family["ft2"], **model_parameters)],
    }


def test_a_parameter_of_another_method_is_ignored_with_a_warning_as_mergekit_does(llama_family, tmp_path):
    # recipes copied from model cards: density on model_stock (per model), gamma on ties (recipe-wide)
    recipe = model_stock(llama_family, density=0.5)
    plan = build_plan(parse_recipe(recipe))
    assert [w for w in plan.warnings if "density" in w] == [
        "models[0].parameters.density: not a parameter of model_stock, ignored (it takes: filter_wise)",
        "models[1].parameters.density: not a parameter of model_stock, ignored (it takes: filter_wise)",
    ]
    merge(recipe, tmp_path / "ours")
    merge(model_stock(llama_family), tmp_path / "plain")
    assert_same_tensors(load_state(tmp_path / "plain"), load_state(tmp_path / "ours"), atol=0, rtol=0, label="ignored")
    # mergekit runs the same recipe file and gives the same tensors
    theirs = run_mergekit(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "mergekit")
    assert_same_tensors(theirs, load_state(tmp_path / "ours"), label="model_stock with density")

    ties = {
        "merge_method": "ties", "base_model": str(llama_family["base"]),
        "models": [entry(llama_family["ft1"], weight=1.0, density=0.5)], "parameters": {"gamma": 0.01, "note": "v2"},
    }
    warnings = build_plan(parse_recipe(ties)).warnings
    assert any(w.startswith("parameters.gamma: not a parameter of ties, ignored") for w in warnings), warnings
    assert any(w.startswith("parameters.note: not a parameter of any method, ignored") for w in warnings), warnings


@pytest.mark.parametrize("typo, meant", [("desnity", "density"), ("lamda", "lambda"), ("epsilom", "epsilon")])
def test_a_name_close_to_a_parameter_is_an_error_with_a_suggestion(llama_family, tmp_path, typo, meant):
    recipe = {
        "merge_method": "della_linear", "base_model": str(llama_family["base"]),
        "models": [entry(llama_family["ft1"], weight=1.0, **{typo: 0.5})],
    }
    with pytest.raises(RecipeError, match=rf"models\[0\]\.parameters\.{typo}: unknown parameter; did you mean '{meant}'\?"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_strict_turns_warnings_into_errors(llama_family, tmp_path):
    recipe = model_stock(llama_family, density=0.5)
    with pytest.raises(RecipeError, match="(?s)--strict.*models\\[0\\]\\.parameters\\.density: not a parameter of model_stock"):
        merge(recipe, tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()
    merge(model_stock(llama_family), tmp_path / "clean", strict=True)  # no warning: merges


def test_cli_warns_and_merges_or_with_strict_refuses(llama_family, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", model_stock(llama_family, density=0.5))

    def run(*flags: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "deltawise", "merge", str(path), *flags, "--quiet"]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    lenient = run(str(tmp_path / "out"))
    assert lenient.returncode == 0, lenient.stderr
    assert "density: not a parameter of model_stock, ignored" in " ".join(lenient.stderr.split())
    strict = run(str(tmp_path / "strict"), "--strict")
    assert strict.returncode == 1
    assert "--strict" in strict.stderr and "density" in strict.stderr
    assert not Path(tmp_path / "strict").exists()
