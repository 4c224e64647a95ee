"""Every adapter method declares its parameters once (typed ``Param``s with defaults, ranges and help):
``get_method`` refuses unknown names and out-of-range values, fills the defaults, and no default is
hidden in the methods' code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from adapt_util import tiny_lm  # noqa: F401
from typer.testing import CliRunner

from deltawise.adapt import MethodError, get_method
from deltawise.adapt.methods import REGISTRY
from deltawise.adapt.methods.common import LORA_PARAMS
from deltawise.adapt.methods.eva import EVA_PARAMS
from deltawise.params import Param, ParamError

METHODS_DIR = Path(__file__).parent.parent / "src" / "deltawise" / "adapt" / "methods"


def test_unknown_parameter_is_refused_with_the_known_names():
    with pytest.raises(MethodError) as info:
        get_method("lora", {"rank": 4, "filter_rank": 2})
    message = str(info.value)
    assert "'filter_rank'" in message and "lora" in message
    assert "alpha, dropout, eva_adjust_scaling, eva_batches, eva_rho, eva_tau, eva_whiten, init, rank, rslora, targets" \
        in message  # the names lora does take
    with pytest.raises(MethodError, match="full has no parameter 'rank'; it takes: no parameters"):
        get_method("full", {"rank": 4})


@pytest.mark.parametrize("method,params,message", [
    ("lora", {"rank": 0}, r"lora: rank=0 is outside \[1, inf\)"),
    ("hft", {"ratio": "1.5"}, r"hft: ratio=1.5 is outside \(0.0, 1.0\]"),
    ("hft", {"ratio": 0}, r"hft: ratio=0.0 is outside \(0.0, 1.0\]"),
    ("lora", {"dropout": 1}, r"lora: dropout=1.0 is outside \[0.0, 1.0\)"),
    ("sorsa", {"gamma": -1e-3}, r"sorsa: gamma=-0.001 is outside \[0.0, inf\)"),
    ("lift", {"rank": 2.5}, r"lift: rank must be an integer, got 2.5"),
    ("fourierft", {"init": "bat"}, r"fourierft: init must be one of random, zero; got 'bat'"),
    ("kasa", {"beta": "x"}, r"kasa: beta must be a number, got 'x'"),
    ("lora", {"targets": "q_proj,,v_proj"}, r"lora: targets must be a comma-separated list of non-empty names"),
])
def test_bad_value_is_refused_with_the_params_message(method, params, message):
    with pytest.raises(MethodError, match=message):
        get_method(method, params)


def test_defaults_are_filled_and_given_values_typed():
    assert get_method("sorsa").values == {"rank": 8, "alpha": None, "gamma": 4e-4, "targets": None}
    assert get_method("kasa").values == {"rank": 8, "alpha": 16.0, "beta": 1e-4, "gamma": 1e-3, "targets": None}
    assert get_method("randlora").values["rank"] == 32 and get_method("miss").values["rank"] == 64
    assert get_method("lift").values == {"rank": 8, "filter_rank": 8, "refresh_interval": 100}
    # text from the command line becomes typed values; a comma list becomes a list of names
    lora = get_method("lora", {"rank": "4", "alpha": "16", "targets": " q_proj , v_proj"}).values
    assert lora == {"rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"], "rslora": False,
                    "init": "kaiming", "eva_rho": 2.0, "eva_tau": 0.99, "eva_whiten": False, "eva_adjust_scaling": True,
                    "eva_batches": None}
    assert isinstance(lora["rank"], int) and isinstance(lora["alpha"], float)


def test_none_default_is_decided_by_the_method():
    """alpha = None means "the method's rule": LoRA uses the rank, RandLoRA 20·rank, SORSA scale 1."""
    from deltawise.adapt.methods.lora import LoRA

    lora = get_method("lora", {"rank": 4})
    assert lora.values["alpha"] is None and isinstance(lora, LoRA) and lora.alpha() == 4
    assert get_method("lora", {"rank": 4, "alpha": None}).alpha() == 4  # an explicit None is the same
    assert get_method("lora", {"rank": 4, "alpha": 32}).alpha() == 32.0
    randlora = get_method("randlora", {"rank": 4}).peft_config("causal_lm", seed=0)
    assert randlora.randlora_alpha == 80
    with pytest.raises(MethodError, match="rank must be a number, got None"):
        get_method("lora", {"rank": None})  # only a None-default parameter takes None


def test_sorsa_gamma_and_kasa_gamma_are_distinct_documented_params():
    sorsa = {p.name: p for p in REGISTRY["sorsa"].params}["gamma"]
    kasa = {p.name: p for p in REGISTRY["kasa"].params}["gamma"]
    assert sorsa is not kasa and sorsa.default == 4e-4 and kasa.default == 1e-3
    assert "orthonormal" in sorsa.help and "identity" in kasa.help and sorsa.help != kasa.help


def test_every_method_documents_itself_and_each_parameter():
    assert set(REGISTRY) >= {"lora", "dora", "pissa", "lora_fa", "fourierft", "miss", "bone", "randlora", "full", "hft", "lift",
                             "sorsa", "loldu", "kasa"}
    for name, cls in REGISTRY.items():
        assert cls.summary.strip() and "\n" not in cls.summary, name
        assert all(isinstance(p, Param) and p.help.strip() for p in cls.params), name
        assert len({p.name for p in cls.params}) == len(cls.params), f"{name}: a parameter is declared twice"
        for p in cls.params:
            if p.default is not None:
                assert p.coerce(p.default) == p.default, f"{name}.{p.name}: the default is outside its own range"
            else:
                assert "default" in p.help, f"{name}.{p.name}: a None default must say in its help what the method does"


def test_lora_family_shares_one_parameter_tuple():
    for name in ("dora", "pissa", "lora_fa"):
        assert REGISTRY[name].params is LORA_PARAMS
    assert REGISTRY["lora"].params == LORA_PARAMS + EVA_PARAMS  # the same tuple plus LoRA's own init=eva


def test_no_default_is_hidden_in_a_get_call():
    """A parameter default lives in its ``Param``, never in ``something.get("name", default)``."""
    offenders = []
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and len(node.args) + len(node.keywords) >= 2 and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
    assert len(list(METHODS_DIR.glob("*.py"))) >= 15  # the glob did find the methods


def test_param_list_kind_takes_lists_and_text():
    names = Param("targets", list, None, help="names")
    assert names.coerce("a, b") == ["a", "b"] and names.coerce(("a",)) == ["a"] and names.coerce(None) is None
    with pytest.raises(ParamError, match="comma-separated list"):
        names.coerce([1, 2])


def test_cli_train_refuses_a_parameter_the_method_does_not_take(tiny_lm, tmp_path):
    from deltawise.cli import app

    res = CliRunner().invoke(app, ["train", str(tiny_lm["model"]), "--data", str(tiny_lm["data"]), "-o", str(tmp_path / "o"),
                                   "--method", "hft", "--rank", "4", "--quiet"])
    assert res.exit_code != 0
    assert "hft has no parameter 'rank'; it takes: ratio" in res.output + str(res.exception)
    assert not (tmp_path / "o").exists()


DOCS = Path(__file__).parent.parent / "docs" / "adapt.md"
BEGIN, END = "<!-- method-params:begin (generated: python tests/test_adapt_params.py) -->", "<!-- method-params:end -->"


def _allowed(p: Param) -> str:
    if p.choices:
        return " \\| ".join(p.choices)
    if p.kind is list:
        return "names, comma-separated"
    if p.low is None and p.high is None:
        return "any"
    low = "−∞" if p.low is None else f"{p.low:g}"
    high = "∞" if p.high is None else f"{p.high:g}"
    opening = "(" if p.low is None or p.low_open else "["
    closing = ")" if p.high is None or p.high_open else "]"
    return f"{opening}{low}, {high}{closing}"


def render_table() -> str:
    """The docs/adapt.md table of every method's parameters, from the methods' own declarations."""
    rows = ["| method | parameter | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- | --- |"]
    groups: dict[int, list[str]] = {}
    for name, cls in REGISTRY.items():  # methods sharing one declaration (the LoRA family, bone = miss) share rows
        groups.setdefault(id(cls.params), []).append(name)
    for names in groups.values():
        cls = REGISTRY[names[0]]
        label = ", ".join(f"`{n}`" for n in names)
        if not cls.params:
            rows.append(f"| {label} | — | | | | {cls.summary} |")
        for i, p in enumerate(cls.params):
            default = "rule (see meaning)" if p.default is None else f"`{p.default!r}`".replace("'", "")
            rows.append(f"| {label if i == 0 else ''} | `{p.name}` | {p.kind.__name__} | {default} | {_allowed(p)} | {p.help} |")
    return "\n".join(rows)


def test_docs_table_is_generated_from_the_declarations():
    text = DOCS.read_text()
    assert BEGIN in text and END in text
    documented = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert documented == render_table(), "docs/adapt.md is stale: regenerate with `python tests/test_adapt_params.py`"


if __name__ == "__main__":
    print(render_table())
