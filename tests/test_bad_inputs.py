"""Bad inputs: every case gives a clear DeltawiseError naming the problem, leaves the inputs
untouched, and leaves nothing under the output name (or exactly what was there) and no
staging folder beside it."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import load_state, tree_digest
from deltawise.errors import DeltawiseError, InputError, OutputError, RecipeError
from deltawise.merge import REGISTRY, merge
from deltawise.merge.staging import staging_folder

LAST = "model.norm.weight"  # merged last (natural order): a problem here is met after most output is written
MID = "model.layers.1.self_attn.q_proj.weight"


# --------------------------------------------------------------------------- helpers
def tree_state(folder: Path) -> tuple[dict[str, str], list[str]] | None:
    """File digests and the list of every entry (empty folders included); None if absent."""
    if not folder.exists():
        return None
    return tree_digest(folder), sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def recipe_inputs(recipe: dict) -> list[Path]:
    refs = [m["model"] for m in recipe.get("models", [])] + [recipe.get("base_model")]
    return [Path(r) for r in dict.fromkeys(refs) if r and Path(r).exists()]


def refused(recipe, out: Path, error: type = DeltawiseError, says=(), inputs=None, **options) -> str:
    """Run a merge that must fail cleanly; return the error message."""
    out = Path(out)
    inputs = recipe_inputs(recipe) if inputs is None else inputs
    before_inputs = {p: tree_state(p) for p in inputs}
    before_out = tree_state(out)
    before_beside = sorted(os.listdir(out.parent))
    with pytest.raises(error) as info:
        merge(recipe, str(out), **options)
    message = str(info.value)
    assert isinstance(info.value, DeltawiseError), f"{type(info.value).__name__} is not a DeltawiseError: {message}"
    for needle in says:
        assert str(needle) in message, f"{needle!r} missing from the error message:\n{message}"
    for p in inputs:
        assert tree_state(p) == before_inputs[p], f"input {p} was modified"
    assert tree_state(out) == before_out, "the output folder changed"
    assert not staging_folder(out).exists(), "staging folder left behind"
    assert sorted(os.listdir(out.parent)) == before_beside, "leftovers beside the output"
    return message


def clone(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_state(folder: Path, edit) -> Path:
    file = folder / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})
    return folder


def ta_recipe(family, *models, base="base", **params) -> dict:
    """task_arithmetic over family members (names) or paths."""
    def ref(m):
        return str(family[m]) if isinstance(m, str) else str(m)
    recipe = {"merge_method": "task_arithmetic", "models": [{"model": ref(m)} for m in models], "parameters": params}
    if base:
        recipe["base_model"] = ref(base)
    return recipe


def write_yaml(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m deltawise`` with no terminal (stdin/stdout/stderr not a tty, no COLUMNS)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "deltawise", *map(str, args)], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=120,
    )


# --------------------------------------------------------------------------- 1, 2: shapes and names
@pytest.mark.parametrize(
    "name, new_shape",
    [(MID, (32, 16)), (MID, (16, 32)), ("model.layers.0.input_layernorm.weight", (31,)),
     ("model.embed_tokens.weight", (100, 32))],
)
def test_shape_mismatch_names_the_tensor(name, new_shape, llama_family, tmp_path):
    bad = edit_state(clone(llama_family["ft2"], tmp_path / "ft2-bad"), lambda s: s.__setitem__(name, torch.zeros(new_shape)))
    message = refused(ta_recipe(llama_family, "ft1", bad), tmp_path / "out", RecipeError, says=[name, str(bad)])
    assert "shape" in message or "rows" in message


@pytest.mark.parametrize("name", [MID, LAST, "lm_head.weight"])
@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_missing_tensor_names_tensor_and_model(name, method, llama_family, tmp_path):
    bad = edit_state(clone(llama_family["ft2"], tmp_path / "lacking"), lambda s: s.pop(name))
    recipe = ta_recipe(llama_family, "ft1", bad, base="base" if method == "task_arithmetic" else None)
    recipe["merge_method"] = method
    refused(recipe, tmp_path / "out", RecipeError, says=[name, str(bad)])


# --------------------------------------------------------------------------- 3: corrupt files
def rewrite_header(file: Path, edit) -> None:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    file.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])


def _in_data_order(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(header):  # two same-size tensors claim the same bytes
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    header[o]["data_offsets"] = list(header[q]["data_offsets"])


def _past_end(header):  # the last tensor shifted beyond the end of the file
    last = _in_data_order(header)[-1]
    header[last]["data_offsets"] = [x + 64 for x in header[last]["data_offsets"]]


def _span_vs_shape(header):  # the shape no longer matches the byte span
    header[MID]["shape"] = [32, 31]


def _gap(header):  # a tensor's span shrunk together with its shape: leaves a hole
    first = _in_data_order(header)[0]
    begin, end = header[first]["data_offsets"]
    header[first]["shape"] = [header[first]["shape"][0] - 1] + header[first]["shape"][1:]
    row = (end - begin) // (header[first]["shape"][0] + 1)
    header[first]["data_offsets"] = [begin, end - row]


def corrupt(kind: str, file: Path) -> None:
    data = file.read_bytes()
    if kind == "garbage":
        file.write_bytes(random.Random(0).randbytes(len(data)))
    elif kind == "truncated":
        file.write_bytes(data[:-7])
    elif kind == "empty":
        file.write_bytes(b"")
    elif kind == "header_not_json":
        file.write_bytes(data[:8] + b"}" + data[9:])  # the header's opening brace
    else:
        rewrite_header(file, {"overlap": _overlap, "past_end": _past_end, "span_vs_shape": _span_vs_shape, "gap": _gap}[kind])


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "header_not_json", "overlap", "past_end", "span_vs_shape",
                                  "gap"])
def test_corrupt_safetensors_names_the_file(kind, llama_family, tmp_path):
    bad = clone(llama_family["ft2"], tmp_path / "ft2-corrupt")
    corrupt(kind, bad / "model.safetensors")
    refused(ta_recipe(llama_family, "ft1", bad), tmp_path / "out", RecipeError,
            says=[str(bad / "model.safetensors"), "not a valid safetensors file"])


# --------------------------------------------------------------------------- 4: NaN / inf while streaming
@pytest.mark.parametrize(
    "role, value", [("model", float("nan")), ("model", float("inf")), ("base", float("-inf"))],
    ids=["nan", "inf", "base-neg-inf"],
)
@pytest.mark.parametrize("out_exists", [False, True], ids=["out-absent", "out-empty"])
def test_non_finite_input_met_while_writing_leaves_no_output(role, value, out_exists, llama_family, tmp_path):
    def poison(state):
        state[LAST][3] = value

    src = "ft2" if role == "model" else "base"
    bad = edit_state(clone(llama_family[src], tmp_path / f"{src}-poisoned"), poison)
    recipe = ta_recipe(llama_family, "ft1", bad) if role == "model" else ta_recipe(llama_family, "ft1", "ft2", base=bad)
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    seen = []  # what the staging folder held while merging was under way

    def progress(stage, done, total):
        if stage == "merging":
            seen.append(sorted(os.listdir(staging_folder(out))))

    refused(recipe, out, InputError, says=[LAST, str(bad), "NaN"], shard_size=20_000, progress=progress)
    finished_shards = {f for files in seen for f in files if f.startswith("model-") and f.endswith(".safetensors")}
    assert finished_shards, f"the merge failed before any shard was written: {seen}"


# --------------------------------------------------------------------------- 5: output onto an input
@pytest.mark.parametrize("where", ["input", "base", "input-via-symlink", "input-relative", "parent-of-input"])
def test_output_onto_an_input_is_refused_even_with_overwrite(where, llama_family, tmp_path, monkeypatch):
    models = tmp_path / "models"
    ft1, ft2 = clone(llama_family["ft1"], models / "ft1"), clone(llama_family["ft2"], models / "ft2")
    base = clone(llama_family["base"], models / "base")
    recipe = ta_recipe(llama_family, ft1, ft2, base=base)
    monkeypatch.chdir(tmp_path)
    out = {
        "input": ft1,
        "base": base,
        "input-relative": Path("models/./ft2"),
        "parent-of-input": models,
    }.get(where)
    if where == "input-via-symlink":
        out = tmp_path / "link"
        out.symlink_to(ft2, target_is_directory=True)
    refused(recipe, out, OutputError, says=["would overwrite input"], inputs=[ft1, ft2, base, models], overwrite=True)


# --------------------------------------------------------------------------- 6: pickle checkpoints
@pytest.fixture
def pickle_ft1(llama_family, tmp_path) -> Path:
    folder = tmp_path / "ft1-pickle"
    folder.mkdir()
    torch.save(load_state(llama_family["ft1"]), folder / "pytorch_model.bin")
    shutil.copy(llama_family["ft1"] / "config.json", folder / "config.json")
    return folder


def test_pickle_checkpoint_refused_without_allow_pickle(pickle_ft1, llama_family, tmp_path):
    refused(ta_recipe(llama_family, pickle_ft1, "ft2"), tmp_path / "out", DeltawiseError,
            says=["pickle", "--allow-pickle", "pytorch_model.bin"])


def test_pickle_checkpoint_with_allow_pickle_matches_safetensors(pickle_ft1, llama_family, tmp_path):
    before = tree_state(pickle_ft1)
    merge(ta_recipe(llama_family, pickle_ft1, "ft2"), str(tmp_path / "from-pickle"), allow_pickle=True)
    merge(ta_recipe(llama_family, "ft1", "ft2"), str(tmp_path / "from-safetensors"))
    assert tree_state(pickle_ft1) == before
    a, b = load_state(tmp_path / "from-pickle"), load_state(tmp_path / "from-safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_does_not_run_even_with_allow_pickle(llama_family, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    state = load_state(llama_family["ft1"])
    state["model.norm.weight"] = _RunsCode(marker)
    torch.save(state, folder / "pytorch_model.bin")
    shutil.copy(llama_family["ft1"] / "config.json", folder / "config.json")
    refused(ta_recipe(llama_family, folder, "ft2"), tmp_path / "out", DeltawiseError, says=["pytorch_model.bin", "weights_only"],
            allow_pickle=True)
    assert not marker.exists(), "the pickle ran code"


# --------------------------------------------------------------------------- 7: existing output
@pytest.fixture
def occupied(tmp_path) -> Path:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    (out / "sub" / "model.safetensors").write_bytes(b"old")
    return out


def test_non_empty_output_refused_without_overwrite(occupied, llama_family):
    refused(ta_recipe(llama_family, "ft1", "ft2"), occupied, OutputError, says=[str(occupied), "--overwrite"])


def test_non_empty_output_replaced_with_overwrite(occupied, llama_family, tmp_path):
    recipe = ta_recipe(llama_family, "ft1", "ft2")
    merge(recipe, str(tmp_path / "reference"))
    merge(recipe, str(occupied), overwrite=True)
    assert sorted(os.listdir(occupied)) == sorted(os.listdir(tmp_path / "reference"))
    assert not (occupied / "keep.txt").exists()
    a, b = load_state(occupied), load_state(tmp_path / "reference")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path)) == ["out", "reference"], "staging or old-output folders left behind"


# --------------------------------------------------------------------------- 8: recipe errors
def test_recipe_problems_reported_together(llama_family, tmp_path):
    missing = tmp_path / "no-such-model"
    recipe = {
        "merge_method": "ties", "base_model": str(llama_family["base"]),
        "models": [{"model": str(llama_family["ft1"]), "parameters": {"denisty": 0.5}},
                   {"model": str(llama_family["ft2"]), "parameters": {"density": 1.5}},
                   {"model": str(missing)}],
    }
    refused(recipe, tmp_path / "out", RecipeError, says=["denisty", str(missing), "density=1.5"])


def test_unknown_parameter_and_missing_model_reported_together(llama_family, tmp_path):
    missing = tmp_path / "no-such-model"
    recipe = ta_recipe(llama_family, "ft1", missing, lamda=0.5)
    recipe["models"][0]["parameters"] = {"wieght": 1}
    refused(recipe, tmp_path / "out", RecipeError, says=["lamda", "wieght", str(missing)])


def test_out_of_range_parameter_names_parameter_and_range(llama_family, tmp_path):
    recipe = {"merge_method": "ties", "base_model": str(llama_family["base"]),
              "models": [{"model": str(llama_family["ft1"])},
                         {"model": str(llama_family["ft2"]), "parameters": {"density": 1.5}}]}
    message = refused(recipe, tmp_path / "out", RecipeError, says=["models[1]", "density=1.5", "[0.0, 1.0]"])
    assert message.count("density=1.5") == 1, "one bad value should be reported once, not once per tensor"


def test_unknown_method_lists_available(llama_family, tmp_path):
    recipe = ta_recipe(llama_family, "ft1", "ft2")
    recipe["merge_method"] = "tyes"
    refused(recipe, tmp_path / "out", RecipeError, says=["tyes", *sorted(REGISTRY)])


@pytest.mark.parametrize(
    "method, models, base, params, says",
    [
        ("slerp", ("ft1", "ft2"), "base", {"t": 0.5}, ["slerp", "at most 1"]),
        ("ties", ("ft1", "ft2"), None, {}, ["ties", "base_model"]),
        ("model_stock", ("ft1",), "base", {}, ["model_stock", "at least 2"]),
        ("slerp", ("ft1",), "base", {}, ["'t'"]),
    ],
    ids=["slerp-two-models", "ties-no-base", "model-stock-one-model", "slerp-no-t"],
)
def test_method_model_count_and_base_rules(method, models, base, params, says, llama_family, tmp_path):
    recipe = ta_recipe(llama_family, *models, base=base, **params)
    recipe["merge_method"] = method
    refused(recipe, tmp_path / "out", RecipeError, says=says)


def test_unknown_top_level_key_is_an_error(llama_family, tmp_path):
    recipe = ta_recipe(llama_family, "ft1", "ft2")
    recipe["base_modle"] = recipe.pop("base_model")
    refused(recipe, tmp_path / "out", RecipeError, says=["base_modle"])


@pytest.mark.parametrize("as_type", [str, Path])
def test_yaml_syntax_error_names_the_file(as_type, tmp_path):
    path = tmp_path / "broken-recipe.yaml"
    path.write_text("merge_method: ties\nmodels:\n  - model: [unclosed\n")
    with pytest.raises(RecipeError, match="broken-recipe.yaml") as info:
        merge(as_type(path), str(tmp_path / "out"))
    assert "YAML" in str(info.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 9, 10: the CLI
def test_cli_reports_errors_without_traceback(llama_family, tmp_path):
    missing = tmp_path / "no-such-model[red]"  # brackets must not be taken for rich markup
    recipe = ta_recipe(llama_family, "ft1", missing)
    recipe["models"][0]["parameters"] = {"wieght": 2}
    path = write_yaml(tmp_path / "recipe.yaml", recipe)
    before = {p: tree_state(p) for p in llama_family.values()}
    proc = run_cli("merge", path, tmp_path / "out", "--quiet", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr
    assert "models[0].parameters.wieght" in proc.stderr
    assert str(missing) in proc.stderr, "the path must appear whole (not folded, not eaten as markup)"
    assert not (tmp_path / "out").exists() and not staging_folder(tmp_path / "out").exists()
    assert {p: tree_state(p) for p in llama_family.values()} == before


@pytest.mark.parametrize(
    "refs",
    [
        "short",  # relative paths
        "hub-cache",  # long absolute paths (> 80 columns): the JSON must not be wrapped
        "brackets",  # [..] in paths must not be eaten as rich markup
    ],
)
def test_dry_run_writes_nothing_and_prints_the_plan(refs, llama_family, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    ref = {}
    for name in ("base", "ft1", "ft2"):
        if refs == "short":  # relative paths keep every JSON line short
            ref[name] = name
        elif refs == "hub-cache":
            snapshot = "0123456789abcdef0123456789abcdef0123456" + name[-1]
            ref[name] = str(work / "hub" / "models--example-org--tiny-llama" / "snapshots" / snapshot)
        else:
            ref[name] = f"runs[bold]/{name}[v2]"
        link = work / ref[name]
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(llama_family[name], target_is_directory=True)
    recipe = {"merge_method": "task_arithmetic", "base_model": ref["base"],
              "models": [{"model": ref["ft1"]}, {"model": ref["ft2"]}], "parameters": {"lambda": 0.7}}
    write_yaml(work / "recipe.yaml", recipe)
    before = tree_state(tmp_path)
    proc = run_cli("merge", "recipe.yaml", "out", "--dry-run", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert tree_state(tmp_path) == before, "--dry-run wrote something"
    assert "Traceback" not in proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["method"] == "task_arithmetic"
    assert plan["base_model"] == ref["base"]
    assert plan["models"] == [ref["ft1"], ref["ft2"]]
    assert plan["tensors"] == len(load_state(llama_family["base"])) == plan["merged_tensors"] + plan["copied_tensors"]
    assert plan["output_bytes"] > 0
    first = next(iter(plan["example_parameters"].values()))
    assert first["params"]["lambda"] == 0.7
    from deltawise.merge import fused

    expected = plan["merged_tensors"] if fused.available() else 0  # float32 checkpoints: every tensor
    assert plan["cpu_kernel"] == {"fused": fused.describe(), "fused_tensors": expected}
