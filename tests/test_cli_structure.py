"""The command line's structure: option groups declared once and torch-free, one module per job
importable alone, no import cycle, train and bam sharing their training options, and the old
spellings still accepted as hidden aliases feeding the same values."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from deltawise.cli import COMMAND_MODULES, app
from deltawise.errors import InputError
from deltawise.options import MethodChoice, TrainingOptions, flag_of, option_fields

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deltawise"


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_option_groups_import_without_torch():
    proc = _fresh("import sys, deltawise.options, deltawise.commands.flags, deltawise.commands.console\n"
                  "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["deltawise.cli", *(f"deltawise.commands.{m}" for m in COMMAND_MODULES)])
def test_each_command_module_imports_alone(module):
    """In a fresh interpreter, and without torch: a command's imports wait until it runs."""
    proc = _fresh(f"import sys, {module}\nprint('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --- the package import graph -------------------------------------------------------------------

def _module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``: imports made only for type hints never run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions.
    ``from X import Y`` counts X and, when Y is a submodule, X.Y."""
    modules = _module_files()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
            else:
                continue
            deps.update(d for d in map(known, names) if d and d != module)
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str]:
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for w in sorted(graph[u]):
            if w == start:
                path = [u]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])  # type: ignore[arg-type]
                return [*reversed(path), start]
            if w not in previous:
                previous[w] = u
                queue.append(w)
    return []


def test_import_graph_sees_function_level_imports():
    graph = import_graph()
    assert "deltawise.commands.console" in graph["deltawise.cli"]
    assert "deltawise.merge" in graph["deltawise.commands.merge"]  # imported inside the command function
    assert "deltawise.search.budget" in graph["deltawise.commands.merge"]  # inside the budget command


def test_no_import_cycle_anywhere():
    graph = import_graph()
    assert not cycles(graph), [shortest_cycle(graph, sorted(c)[0]) for c in cycles(graph)]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}] and shortest_cycle(graph, "a") == ["a", "b", "c", "a"]


# --- train and bam share one declaration of the training options --------------------------------

def _command(name: str):
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _shared(command, fields: set[str]) -> dict[str, tuple]:
    return {p.name: (tuple(p.opts), tuple(p.secondary_opts), p.help, p.hidden, p.multiple, p.is_flag) for p in command.params
            if p.name in fields}


def test_train_and_bam_show_the_same_training_options():
    fields = {f.name for f in option_fields(TrainingOptions)} | {f.name for f in option_fields(MethodChoice)} - {"rank"}
    train, bam = _shared(_command("train"), fields), _shared(_command("bam"), fields)
    assert set(train) == fields and train == bam
    visible = [f for f in option_fields(TrainingOptions) + option_fields(MethodChoice) if not flag_of(f).hidden]
    for name in ("train", "bam"):
        text = CliRunner().invoke(app, [name, "--help"], terminal_width=400, env={"COLUMNS": "400"}).output
        for f in visible:
            assert flag_of(f).long_name(f.name) in text, (name, f.name)
        assert "--method-option" not in text and "--filter-rank" not in text  # old spellings are hidden


def test_bam_keeps_its_own_defaults_for_the_shared_group():
    defaults = {p.name: p.default for p in _command("bam").params}
    assert (defaults["lr"], defaults["schedule"], defaults["warmup"], defaults["method"]) == (5e-5, "cpt", 0.01, "full")
    defaults = {p.name: p.default for p in _command("train").params}
    assert (defaults["lr"], defaults["schedule"], defaults["warmup"], defaults["method"]) == (2e-4, "linear", 0.0, "lora")
    assert (defaults["lr"], defaults["schedule"]) == (TrainingOptions.lr, TrainingOptions.schedule)


def test_help_names_the_ray_extra_of_every_executor_command():
    # rich draws --help and takes an unescaped [ray] for markup: the install hint would lose the extra's name
    for name in ("bam", "lr-sweep", "budget"):
        text = CliRunner().invoke(app, [name, "--help"], terminal_width=400, env={"COLUMNS": "400"}).output
        assert "pip install 'deltawise[ray]'" in text, name


def test_short_flags_are_consistent():
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name, command in commands.items():
        for param in getattr(command, "params", []):
            if "--output" in param.opts:
                assert "-o" in param.opts, name
            if "--quiet" in param.opts:
                assert "-q" in param.opts, name
            if param.name == "method":
                assert "-m" in param.opts, name
            if param.name == "task":
                assert param.default in ("auto", None), name


# --- old spellings feed the same values ---------------------------------------------------------

@pytest.fixture
def captured_train(monkeypatch, tmp_path):
    import deltawise.adapt

    seen = {}

    def fake_run_train(cfg, model_path=None, **_reporting):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(deltawise.adapt, "run_train", fake_run_train)
    data = tmp_path / "d.txt"
    data.write_text("one\n%\ntwo\n")
    (tmp_path / "model").mkdir()  # train refuses a model path that does not exist
    return seen, ["train", str(tmp_path / "model"), "--data", str(data), "-o", str(tmp_path / "out")]


def test_method_params_from_new_and_old_flags(captured_train):
    seen, args = captured_train
    old_flags = ["-r", "4", "--alpha", "8", "--method-option", "ratio=0.5"]
    res = CliRunner().invoke(app, [*args, "-p", "targets=q_proj,v_proj", *old_flags])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].method_params == {"targets": "q_proj,v_proj", "rank": 4, "alpha": 8.0, "ratio": "0.5"}
    assert "--rank is deprecated" in res.output and seen["cfg"].task == "causal_lm" and seen["cfg"].lr == 2e-4


def test_method_param_given_twice_is_an_error(captured_train):
    seen, args = captured_train
    res = CliRunner().invoke(app, [*args, "-p", "rank=4", "--rank", "4"])
    assert res.exit_code != 0 and isinstance(res.exception, InputError) and "given twice" in str(res.exception)
    res = CliRunner().invoke(app, [*args, "-p", "rank=4", "-p", "rank=8"])
    assert isinstance(res.exception, InputError) and "given twice" in str(res.exception)
    assert "cfg" not in seen


def test_bam_r_still_means_rounds(monkeypatch, tmp_path):
    import deltawise.adapt.bam

    seen = {}

    def fake_run_bam(cfg, **kw):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(deltawise.adapt.bam, "run_bam", fake_run_bam)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a", "label": "x"}) + "\n")
    (tmp_path / "m").mkdir()  # bam refuses a model path that does not exist
    base = ["bam", str(tmp_path / "m"), "--data", str(data), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(app, [*base, "-r", "3", "--rank", "2"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.rounds == 3 and cfg.train.method_params == {"rank": 2} and cfg.train.method == "full"
    assert cfg.train.task == "classification"  # --task auto: the records carry a label
    assert (cfg.train.lr, cfg.train.schedule) == (5e-5, "cpt")
    res = CliRunner().invoke(app, [*base, "-r", "3", "--rounds", "2"])
    assert isinstance(res.exception, InputError)


def test_analyze_tall_lambda_is_an_alias_of_lam(monkeypatch, tmp_path):
    from deltawise.analyze import weights

    seen = []

    def fake(base, models, opts):
        seen.append(opts.tall_lambda)
        raise SystemExit(0)

    monkeypatch.setattr(weights, "analyze_weights", fake)
    args = ["analyze", "weights", "b", "m", "-o", str(tmp_path / "a.json")]
    for extra in ([], ["--lam", "0.7"], ["--tall-lambda", "0.6"]):
        assert CliRunner().invoke(app, [*args, *extra]).exit_code == 0
    assert seen == [0.4, 0.7, 0.6]
    res = CliRunner().invoke(app, [*args, "--lam", "0.7", "--tall-lambda", "0.6"])
    assert isinstance(res.exception, InputError)


def test_merge_retain_is_a_hidden_way_into_budget(monkeypatch, tmp_path):
    import deltawise.commands.merge as merge_cmd

    calls = []
    monkeypatch.setattr(merge_cmd, "_run_budget", lambda recipe, run, engine, search, *groups: calls.append(
        (run.output, search.retain, search.refine)))
    old = CliRunner().invoke(app, ["merge", "r.yaml", str(tmp_path / "o"), "--retain", "en.txt:0.9", "--target", "de.txt",
                                   "--refine", "2"])
    new = CliRunner().invoke(app, ["budget", "r.yaml", str(tmp_path / "o"), "--retain", "en.txt:0.9", "--target", "de.txt",
                                   "--refine", "2"])
    assert old.exit_code == 0 and new.exit_code == 0, (old.output, new.output)
    assert calls[0] == calls[1] == (tmp_path / "o", ["en.txt:0.9"], 2)
    assert "deprecated" in old.output
    merge_help = CliRunner().invoke(app, ["merge", "--help"], terminal_width=400).output
    budget_help = CliRunner().invoke(app, ["budget", "--help"], terminal_width=400).output
    assert "--retain" not in merge_help and "--retain" in budget_help


def test_methods_lists_merge_and_adapter_methods():
    both = CliRunner().invoke(app, ["methods"], terminal_width=400)
    adapters = CliRunner().invoke(app, ["methods", "--kind", "adapter"], terminal_width=400)
    assert both.exit_code == 0 and adapters.exit_code == 0
    assert "merge methods" in both.output and "training methods" in both.output
    assert "merge methods" not in adapters.output and "lora" in adapters.output and "sorsa" in adapters.output
    assert CliRunner().invoke(app, ["methods", "--kind", "nope"]).exit_code != 0
