"""Hostile and careless input files and values (issue 15, part B; docs/safety.md, "Inputs").

One test per item: index paths that leave the model folder, FIFOs and other non-regular files,
non-finite numbers on the command line and in tensors, and the messages for malformed or misplaced
inputs. Each says what is wrong in one clear message (a DeltawiseError, or a usage error for an
option) instead of a traceback, a hang or a silently broken output.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from deltawise.cli import app
from deltawise.data.read import load_items, read_data
from deltawise.errors import DeltawiseError, InputError, RecipeError
from deltawise.io.reader import ModelReader

TENSORS = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b.weight": torch.ones(4, 4)}


# --------------------------------------------------------------------------- helpers
def invoke(*args: Any):
    return CliRunner().invoke(app, [str(a) for a in args])


def finishes(call: Callable[[], Any], fifos: list[Path], seconds: float = 20.0) -> BaseException | None:
    """Run ``call`` in a thread; fail if it is still blocked after ``seconds`` (a FIFO being read).

    A blocked reader is released by opening the FIFOs for writing and closing them, so a failing
    test ends instead of hanging the suite. Returns the exception ``call`` raised (None if none)."""
    outcome: dict[str, BaseException | None] = {"error": None}

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    blocked = thread.is_alive()
    if blocked:
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(10)
    assert not blocked, f"still blocked on a FIFO after {seconds} s"
    return outcome["error"]


def sharded(tmp_path: Path, weight_map: Any, name: str = "model") -> Path:
    """A model folder with one real shard and an index whose weight_map is ``weight_map``."""
    folder = tmp_path / name
    folder.mkdir()
    save_file(TENSORS, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def refused_reading(folder: Path, *says: str) -> str:
    with pytest.raises(InputError) as info:
        ModelReader(folder)
    message = str(info.value)
    for needle in says:
        assert needle in message, f"{needle!r} missing from: {message}"
    return message


# --------------------------------------------------------------------------- failure 4: index paths
def test_index_naming_an_absolute_path_is_refused(tmp_path):
    folder = sharded(tmp_path, {"a.weight": "/etc/passwd", "b.weight": "model-00001-of-00001.safetensors"})
    refused_reading(folder, "/etc/passwd", "outside the model folder")


def test_index_naming_a_deep_parent_path_is_refused(tmp_path):
    deep = "../" * 30 + "etc/passwd"
    folder = sharded(tmp_path, {"a.weight": deep, "b.weight": "model-00001-of-00001.safetensors"})
    refused_reading(folder, "leaves the model folder")


def test_index_naming_a_safetensors_file_in_another_folder_is_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"a.weight": torch.full((3, 4), 7.0)}, other / "evil.safetensors")
    folder = sharded(tmp_path, {"a.weight": "../other/evil.safetensors", "b.weight": "model-00001-of-00001.safetensors"})
    refused_reading(folder, "../other/evil.safetensors", "leaves the model folder")


def test_index_naming_a_pickle_shard_is_refused(tmp_path):
    """A safetensors index may not smuggle in a pickle file (which would skip the --allow-pickle rule)."""
    folder = sharded(tmp_path, {"a.weight": "model-00001-of-00001.safetensors", "b.weight": "extra.bin"})
    torch.save({"b.weight": torch.ones(4, 4)}, folder / "extra.bin")
    refused_reading(folder, "extra.bin", "not a .safetensors file")


def test_index_shards_symlinked_out_of_the_folder_are_read_as_in_the_hub_cache(tmp_path):
    """The hub cache layout: snapshots/<rev>/<shard> is a symlink into blobs/; the name stays inside."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file(TENSORS, blobs / "0123abcd")
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/0123abcd")
    weight_map = {name: "model-00001-of-00001.safetensors" for name in TENSORS}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reader = ModelReader(snapshot)
    assert torch.equal(reader.get("a.weight"), TENSORS["a.weight"])


def test_weight_map_that_is_a_list_is_a_message_not_a_traceback(tmp_path):
    folder = sharded(tmp_path, ["a.weight", "b.weight"])
    refused_reading(folder, "weight_map must be an object", "list")


# --------------------------------------------------------------------------- failure 5: FIFOs
@pytest.mark.parametrize("where", ["single", "loose", "index-shard", "the-path-itself"])
def test_fifo_as_a_shard_is_refused_without_blocking(where, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    if where == "single":
        fifo = folder / "model.safetensors"
    elif where == "loose":
        save_file(TENSORS, folder / "a.safetensors")
        fifo = folder / "b.safetensors"
    elif where == "index-shard":
        save_file(TENSORS, folder / "real.safetensors")
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a.weight": "real.safetensors", "b.weight": "fifo.safetensors"}}))
        fifo = folder / "fifo.safetensors"
    else:
        fifo = tmp_path / "model.safetensors"
        folder = fifo
    os.mkfifo(fifo)
    error = finishes(lambda: ModelReader(folder), [fifo])
    assert isinstance(error, InputError), repr(error)
    assert "FIFO" in str(error) and str(fifo.name) in str(error)


def test_fifo_as_a_data_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    error = finishes(lambda: read_data(fifo), [fifo])
    assert isinstance(error, InputError) and "FIFO" in str(error) and "data.jsonl" in str(error), repr(error)


def test_fifo_as_config_json_is_refused_without_blocking(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(TENSORS, folder / "model.safetensors")
    os.mkfifo(folder / "config.json")
    error = finishes(lambda: ModelReader(folder).config, [folder / "config.json"])
    assert isinstance(error, InputError) and "FIFO" in str(error), repr(error)


# --------------------------------------------------------------------------- failure 6: numbers
@pytest.fixture
def pair(make_folder) -> dict[str, Path]:
    """A base, a fine-tune of it (every tensor changed) and the delta between them."""
    from deltawise.delta.extract import extract_delta

    base = make_folder("base", TENSORS)
    ft = make_folder("ft", {k: v + 0.5 for k, v in TENSORS.items()})
    delta = base.parent / "delta"
    extract_delta(str(ft), str(base), delta)
    return {"base": base, "ft": ft, "delta": delta}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309"])
def test_apply_scale_must_be_finite(value, pair, tmp_path):
    result = invoke("apply", pair["delta"], "--base", pair["base"], "-o", tmp_path / "out", "--scale", value)
    assert result.exit_code == 2, result.output
    assert "finite" in result.output and "--scale" in result.output
    assert not (tmp_path / "out").exists()


def test_apply_scale_too_large_for_the_dtype_names_the_tensor(pair, tmp_path):
    result = invoke("apply", pair["delta"], "--base", pair["base"], "-o", tmp_path / "out", "--scale", "1e300")
    assert isinstance(result.exception, DeltawiseError), result.output
    assert "a.weight" in str(result.exception) and "--scale" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_apply_library_refuses_a_non_finite_scale(pair, tmp_path):
    from deltawise.delta.apply import apply_delta

    with pytest.raises(DeltawiseError, match="finite"):
        apply_delta(str(pair["delta"]), str(pair["base"]), tmp_path / "out", scale=float("nan"))


def test_compress_alpha_must_be_finite(pair, tmp_path):
    result = invoke("compress", pair["delta"], "-o", tmp_path / "out", "--alpha", "-1e309")
    assert result.exit_code == 2, result.output
    assert "finite" in result.output and "--alpha" in result.output
    from deltawise.delta.compress import compress_delta

    with pytest.raises(DeltawiseError, match="finite"):
        compress_delta(str(pair["delta"]), tmp_path / "out2", alpha=float("-inf"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_retention_budget_minimum_must_be_finite(value):
    from deltawise.search.budget import RetentionBudget

    with pytest.raises(InputError, match="positive number"):
        RetentionBudget.parse(f"en.jsonl:{value}")


def test_every_float_option_of_every_command_refuses_non_finite_values():
    from deltawise.commands.flags import holds_float, reject_nonfinite

    def commands(typer_app):
        for command in typer_app.registered_commands:
            yield command.callback
        for group in typer_app.registered_groups:
            yield from commands(group.typer_instance)

    checked = []
    for command in commands(app):
        for parameter in inspect.signature(command).parameters.values():
            if holds_float(parameter.annotation):
                assert getattr(parameter.default, "callback", None) is reject_nonfinite, f"{command.__name__} {parameter.name}"
                checked.append(f"{command.__name__}.{parameter.name}")
    assert {"apply.scale", "compress.alpha", "compress.lam", "train.lr", "extract.energy", "atlas.lr"} <= set(checked)
    with pytest.raises(Exception, match="finite"):
        reject_nonfinite([1.0, float("nan")])


def test_nan_in_the_base_is_refused_by_apply_naming_the_tensor(pair, make_folder, tmp_path):
    from deltawise.delta.apply import apply_delta

    bad = make_folder("bad_base", {**TENSORS, "b.weight": torch.full((4, 4), float("nan"))})
    with pytest.raises(InputError, match="'b.weight'.*NaN"):
        apply_delta(str(pair["delta"]), str(bad), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_in_the_finetuned_model_is_refused_by_extract_naming_the_tensor(make_folder, tmp_path):
    from deltawise.delta.extract import extract_delta

    base = make_folder("base", TENSORS)
    ft = make_folder("ft", {**TENSORS, "a.weight": torch.tensor([[float("inf")] * 4] * 3)})
    with pytest.raises(InputError, match="'a.weight'.*NaN or infinite"):
        extract_delta(str(ft), str(base), tmp_path / "delta")
    assert not (tmp_path / "delta").exists()


@pytest.mark.parametrize("method", ["compeft", "tall"])
def test_nan_in_a_delta_is_refused_by_compress_naming_the_tensor(method, pair, make_folder, tmp_path):
    from deltawise.delta.compress import compress_delta
    from deltawise.delta.extract import extract_delta
    from deltawise.delta.tall_compress import compress_tall

    from safetensors import safe_open

    file = pair["delta"] / "delta-00001.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        state, metadata = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, file, metadata=metadata)
    with pytest.raises(InputError, match=f"{key.split('::')[0]}.*NaN"):
        if method == "tall":
            other = make_folder("ft2", {k: v - 0.25 for k, v in TENSORS.items()})
            extract_delta(str(other), str(pair["base"]), tmp_path / "delta2")
            compress_tall([str(tmp_path / "delta2"), str(pair["delta"])], tmp_path / "out")
        else:
            compress_delta(str(pair["delta"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- silent before
def test_duplicated_tensor_name_in_a_header_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    entry = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    header = ('{"w":' + entry + ',"w":' + entry + '}').encode()
    header += b" " * (-len(header) % 8)
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    refused_reading(folder, "twice", "'w'")


def test_extract_from_a_finetune_missing_tensors_warns_with_the_list(make_folder, tmp_path):
    from deltawise.delta.extract import extract_delta

    base = make_folder("base", {**TENSORS, "c.bias": torch.zeros(4)})
    ft = make_folder("ft", {"a.weight": TENSORS["a.weight"] + 1, "b.weight": TENSORS["b.weight"]})
    result = extract_delta(str(ft), str(base), tmp_path / "delta")
    assert any("c.bias" in w and "missing from the fine-tuned model" in w for w in result.warnings), result.warnings


def test_tokenizer_source_without_a_tokenizer_is_a_recipe_problem(llama_family, tmp_path):
    """Rows are matched by token string, which needs the tokenizers: models without one are refused."""
    from deltawise.merge import build_plan
    from deltawise.merge.recipe import parse_recipe

    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(llama_family["ft1"])},
                                                                {"model": str(llama_family["ft2"])}],
                           "tokenizer_source": str(llama_family["ft1"])})
    with pytest.raises(RecipeError, match="no tokenizer files; rows are matched by token string"):
        build_plan(recipe)


def test_tokenizer_source_that_does_not_exist_is_a_recipe_problem(llama_family):
    from deltawise.merge import build_plan
    from deltawise.merge.recipe import parse_recipe

    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(llama_family["ft1"])},
                                                                {"model": str(llama_family["ft2"])}],
                           "tokenizer_source": "./no-such-tokenizer"})
    with pytest.raises(RecipeError, match="tokenizer_source.*no-such-tokenizer"):
        build_plan(recipe)


# --------------------------------------------------------------------------- messages
def test_one_wrong_recipe_value_is_one_line_and_other_problems_still_show():
    from deltawise.merge.recipe import parse_recipe

    with pytest.raises(RecipeError) as info:
        parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"valu": 1}}}],
                      "seed": "x", "bogus": 1})
    lines = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert len(lines) == 3, str(info.value)
    assert any("models.0.parameters.weight" in line and "valu" in line for line in lines)
    assert any(line.startswith("  - seed:") for line in lines) and any(line.startswith("  - bogus:") for line in lines)


def test_missing_relative_path_names_the_working_directory_and_the_recipe_folder(llama_family, tmp_path, monkeypatch):
    from deltawise.merge import build_plan
    from deltawise.merge.recipe import load_recipe

    recipes = llama_family["ft1"].parent / "recipes"
    recipes.mkdir(exist_ok=True)
    recipe = recipes / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "../ft1"}, {"model": "../ft2"}]}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        build_plan(load_recipe(recipe))
    message = str(info.value)
    assert "../ft1" in message and str(tmp_path) in message, message
    assert "relative to the recipe's folder" in message and str(llama_family["ft1"]) in message, message


def test_missing_model_path_in_train_says_it_does_not_exist(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("hello world\n")
    result = invoke("train", tmp_path / "no-such-model", "--data", data, "-o", tmp_path / "out", "--quiet")
    assert isinstance(result.exception, InputError), result.output
    assert "not found" in str(result.exception) and "Repo id" not in str(result.exception)


def test_unknown_architecture_in_train_says_to_pass_targets():
    from torch import nn

    from deltawise.adapt.methods import get_method

    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "mystery", "to_dict": lambda self: {"model_type": "mystery"}})()
            self.mixer = nn.Linear(4, 4)

        def forward(self, x):
            return self.mixer(x)

    method = get_method("lora", {})
    with pytest.raises(DeltawiseError, match=r"-p targets=.*mixer"):
        method.prepare(Mystery(), "causal_lm", 0)


def test_pickle_only_folder_in_eval_does_not_advise_a_flag_eval_lacks(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save(TENSORS, folder / "pytorch_model.bin")
    data = tmp_path / "d.txt"
    data.write_text("hello\n")
    result = invoke("eval", folder, "--source", data, "-o", tmp_path / "r.json")
    assert isinstance(result.exception, InputError), result.output
    message = str(result.exception)
    assert "Convert it to safetensors" in message and "eval" in message and "do not read pickle" in message


@pytest.mark.parametrize("content", [b"\x00\x01binary\xff", b"\xff\xfe\xfa not utf-8"])
def test_binary_data_is_a_clear_message_for_eval_and_train(content, tmp_path):
    from deltawise.adapt.data import read_examples

    data = tmp_path / "blob.txt"
    data.write_bytes(content)
    for read in (lambda: load_items(data), lambda: read_examples(data)):
        with pytest.raises(InputError, match="blob.txt"):
            read()


def test_jsonl_missing_fields_names_the_file_and_line(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"text": "ok"}\n{"prompt": "no text"}\n')
    with pytest.raises(InputError, match=r"qa.jsonl:2.*lacks field"):
        load_items(data, require=("text",))


# --------------------------------------------------------------------------- promises that held already
def test_yaml_python_tags_in_a_recipe_are_refused_and_run_nothing(tmp_path):
    from deltawise.merge.recipe import load_recipe

    marker = tmp_path / "ran"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: !!python/object/apply:os.system ['touch {marker}']\nmodels: [a, b]\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(recipe)
    assert not marker.exists()


def test_hub_kernels_are_off_unless_the_user_turns_them_on():
    """transformers' switch for fetching and running hub kernels on a GPU (docs/safety.md): off once deltawise is
    imported, unless the environment turned it on."""
    import subprocess

    code = ("import os, deltawise; from transformers.integrations.hub_kernels import _kernels_enabled; "
            "print(os.environ['USE_HUB_KERNELS'], _kernels_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    for given, expected in ((None, ["NO", "False"]), ("YES", ["YES", "True"]), ("no", ["no", "False"])):
        here = env if given is None else {**env, "USE_HUB_KERNELS": given}
        out = subprocess.run([sys.executable, "-c", code], env=here, capture_output=True, text=True, timeout=300)
        assert out.stdout.split() == expected, out.stderr[-2000:]
