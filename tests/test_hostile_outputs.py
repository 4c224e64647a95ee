"""Hostile and careless use, outputs side (issue 15 part A; docs/safety.md): no code from a model
folder runs without --trust-remote-code, no single-file output overwrites an input, one writer per
output at a time (a race of many merge pairs), pickle only with --allow-pickle, and clear messages
for interrupts, resumes, full or read-only disks and a training run that would train nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deltawise
from adapt_util import tiny_lm, train_cfg  # noqa: F401  (fixture)
from conftest import noisy_family, tree_digest
from deltawise.cli import app
from deltawise.errors import DeltawiseError, InputError, OutputError
from deltawise.io import writer as writer_module
from deltawise.io.output import check_output_folder
from deltawise.io.verify import verify_folder
from deltawise.merge import merge
from deltawise.merge.staging import staging_folder

# the child processes import the deltawise this test process imported
SRC = str(Path(deltawise.__file__).resolve().parents[1])
EVIL_CONFIG = """
from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "deltawise_evil"
"""


def run_cli(args: list[str], *, stdin: str = "", prelude: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``deltawise ARGS`` in a fresh interpreter (through ``deltawise.cli.main``, as the console script runs it)."""
    code = textwrap.dedent(f"""
        import sys
        {prelude}
        sys.argv = ["deltawise", *{args!r}]
        from deltawise.cli import main
        main()
    """)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def invoke(args: list[str]):
    """The command in this process: a refusal surfaces as ``result.exception`` (main() would print it)."""
    return CliRunner().invoke(app, args)


def evil_folder(tiny_lm, root: Path) -> tuple[Path, Path]:  # noqa: F811
    """A copy of the tiny LM whose config names an architecture only its own Python file defines."""
    folder = root / "evil"
    shutil.copytree(tiny_lm["model"], folder)
    marker = root / "code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="deltawise_evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                         "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return folder, marker


# --- failure 1: code from a model folder ---------------------------------------------------------------------------

def test_eval_never_runs_folder_code_even_when_stdin_says_yes(tiny_lm, tmp_path):  # noqa: F811
    folder, marker = evil_folder(tiny_lm, tmp_path)
    proc = run_cli(["eval", str(folder), "--source", str(tiny_lm["data"]), "-o", str(tmp_path / "r.json"), "-q"],
                   stdin="y\n" * 5)
    assert not marker.exists(), "the model folder's code ran"
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "--trust-remote-code" in proc.stderr and "configuration_evil.py" in proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr  # no prompt: stdin is never read


def test_train_refuses_a_folder_that_needs_its_own_code(tiny_lm, tmp_path):  # noqa: F811
    from deltawise.adapt import run_train

    folder, marker = evil_folder(tiny_lm, tmp_path)
    with pytest.raises(InputError, match="--trust-remote-code"):
        run_train(train_cfg(tiny_lm, tmp_path / "out", "lora", model=folder))
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_trust_remote_code_lets_the_code_run(tiny_lm, tmp_path):  # noqa: F811
    from deltawise.eval.models import load_model

    folder, marker = evil_folder(tiny_lm, tmp_path)
    with pytest.raises(Exception):
        load_model(folder, trust_remote_code=True)  # the code runs, then has no model class to offer
    assert marker.exists()


@pytest.mark.parametrize("command", [["eval"], ["train"], ["bam"], ["analyze", "interpolate"], ["fisher"], ["gram"],
                                     ["soup"], ["atlas"], ["budget"]])
def test_every_command_that_loads_through_transformers_has_the_flag(command):
    result = invoke([*command, "--help"])
    assert result.exit_code == 0 and "--trust-remote-code" in result.output


# --- failure 2: single-file outputs never overwrite an input ---------------------------------------------------------

@pytest.fixture
def inputs(tiny_lm, tmp_path) -> dict[str, Path]:  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(tiny_lm["model"], model)
    data = tmp_path / "data.txt"
    shutil.copy(tiny_lm["data"], data)
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"schema": "deltawise.eval/1", "kind": "eval"}))
    return {"model": model, "data": data, "result": result}


def refused(args: list[str], protected: list[Path]) -> None:
    before = {p: p.read_bytes() for p in protected}
    result = invoke(args)
    assert isinstance(result.exception, OutputError), (result.exception, result.output[-1500:])
    assert {p: p.read_bytes() for p in protected} == before


def test_eval_output_inside_the_model_folder_is_refused(inputs):
    config = inputs["model"] / "config.json"
    refused(["eval", str(inputs["model"]), "--source", str(inputs["data"]), "-o", str(config), "-q"], [config])


def test_eval_output_equal_to_its_data_or_baseline_is_refused(inputs):
    data, baseline = inputs["data"], inputs["result"]
    refused(["eval", str(inputs["model"]), "--source", str(data), "-o", str(data), "-q"], [data])
    refused(["eval", str(inputs["model"]), "--source", str(data), "--baseline", str(baseline), "-o", str(baseline), "-q"],
            [baseline])


def test_analyze_outputs_are_refused_on_inputs(inputs, llama_family):
    config = inputs["model"] / "config.json"
    refused(["analyze", "weights", str(inputs["model"]), str(llama_family["ft1"]), "-o", str(config), "-q"], [config])
    refused(["analyze", "interpolate", str(inputs["model"]), str(inputs["model"]), "--data", str(inputs["data"]),
             "-o", str(inputs["data"]), "-q"], [inputs["data"]])


def test_report_output_equal_to_a_result_it_reads_is_refused(inputs):
    refused(["report", str(inputs["result"]), "-o", str(inputs["result"])], [inputs["result"]])


def test_extract_and_apply_reports_are_refused_on_inputs(llama_family, tmp_path):
    base_config = llama_family["base"] / "config.json"
    refused(["extract", str(llama_family["ft1"]), "--base", str(llama_family["base"]), "-o", str(tmp_path / "delta"),
             "--report", str(base_config), "-q"], [base_config])
    assert not (tmp_path / "delta").exists()  # refused before any work
    result = invoke(["extract", str(llama_family["ft1"]), "--base", str(llama_family["base"]), "-o", str(tmp_path / "d"),
                     "--report", str(tmp_path / "d"), "-q"])
    assert isinstance(result.exception, OutputError) and not (tmp_path / "d").exists()


def test_statistics_output_equal_to_the_data_is_refused(inputs):
    # a regression guard: fisher refused this before (its output must end with .safetensors); now the shared check does
    refused(["fisher", str(inputs["model"]), "--data", str(inputs["data"]), "-o", str(inputs["data"]), "--overwrite", "-q"],
            [inputs["data"]])


def test_single_file_outputs_are_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    target.write_text("old")

    def no_rename(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(writer_module.os, "replace", no_rename)
    with pytest.raises(OSError):
        writer_module.write_json_atomic(target, {"new": 1})
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left behind


# --- failure 3: one writer per output ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def race_family(tmp_path_factory) -> dict[str, Path]:
    """Base + 2 models of 6 tensors 128x128 float32 (64 kB each): several shards, merged in a few ms."""
    return noisy_family(tmp_path_factory.mktemp("race"), 6, 128)


def linear_recipe(family: dict[str, Path], weight: float) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(family["ft1"]), "parameters": {"weight": weight}},
                                                 {"model": str(family["ft2"]), "parameters": {"weight": 1 - weight}}]}


def test_two_merges_racing_for_one_output_never_both_succeed(race_family, tmp_path):
    for pair in range(20):
        out = tmp_path / f"out{pair}"
        start = threading.Barrier(2)
        outcomes: dict[float, object] = {}

        def run(weight: float) -> None:
            start.wait()
            try:
                # every other pair, the second merge also passes --restart (discard an interrupted merge)
                restart = weight == 0.7 and pair % 2 == 1
                merge(linear_recipe(race_family, weight), out, threads=1, shard_size=140_000, restart=restart)
                outcomes[weight] = "ok"
            except DeltawiseError as exc:
                outcomes[weight] = exc

        threads = [threading.Thread(target=run, args=(w,)) for w in (0.3, 0.7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [w for w, o in outcomes.items() if o == "ok"]
        assert len(winners) == 1, outcomes
        loser = next(o for o in outcomes.values() if o != "ok")
        assert isinstance(loser, OutputError) and ("another deltawise run" in str(loser) or "not empty" in str(loser))
        report = verify_folder(out)
        assert report.ok, report.problems
        manifest = json.loads((out / "deltawise_merge.json").read_text())
        assert manifest["recipe"]["models"][0]["parameters"]["weight"] == winners[0]  # one recipe's shards only
        assert not staging_folder(out).exists() and not (tmp_path / f".out{pair}.lock").exists()


# imports first, then waits for the start file: the two merges start within milliseconds of each other
RACER = """
import os, sys, time
from deltawise.cli import main
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.002)
sys.argv = ["deltawise", *sys.argv[2:]]
main()
"""


def test_two_merge_processes_racing_for_one_output_never_both_succeed(tmp_path):
    """The same race between processes (the lock is the OS's, not the interpreter's), on merges long enough to overlap."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    family = {}
    for name in ("ft1", "ft2"):
        (tmp_path / name).mkdir()
        save_file({f"model.layers.{i}.w": torch.randn(512, 512, generator=gen) for i in range(8)},
                  tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        family[name] = tmp_path / name
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    recipes = []
    for weight in (0.3, 0.7):
        recipes.append(tmp_path / f"recipe{weight}.yaml")
        recipes[-1].write_text(json.dumps(linear_recipe(family, weight)))
    for pair in range(3):
        out, go = tmp_path / f"out{pair}", tmp_path / f"go{pair}"
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(go), "merge", str(r), str(out), "-q", "--threads", "1",
                                   "--shard-size", "2100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in recipes]
        time.sleep(8)  # both have imported torch and wait
        go.touch()
        results = [proc.communicate(timeout=300) + (proc.returncode,) for proc in procs]
        codes = sorted(code for _, _, code in results)
        assert codes == [0, 1], results
        message = next(err for _, err, code in results if code == 1)
        assert "another deltawise run" in message or "not empty" in message, message
        report = verify_folder(out)
        assert report.ok and not staging_folder(out).exists(), report.problems


def test_a_second_writer_is_told_which_process_holds_the_output(race_family, tmp_path):
    from deltawise.io.output import output_lock

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(linear_recipe(race_family, 0.5)))
    out = tmp_path / "out"
    with output_lock(out):
        proc = run_cli(["merge", str(recipe), str(out), "-q"])
    assert proc.returncode == 1 and f"process {os.getpid()}" in proc.stderr, proc.stderr
    assert not out.exists() and not staging_folder(out).exists()
    assert run_cli(["merge", str(recipe), str(out), "-q"]).returncode == 0  # the lock went with its holder


def test_continual_state_folder_and_bam_work_folder_are_locked(race_family, tmp_path, tiny_lm):  # noqa: F811
    from deltawise.adapt.bam import BamConfig, run_bam
    from deltawise.io.output import output_lock

    state = tmp_path / "state"
    recipe = {"merge_method": "opcm", "base_model": str(race_family["base"]), "models": [{"model": str(race_family["ft1"])}],
              "parameters": {"state": str(state)}}
    with output_lock(state, "state folder"), pytest.raises(OutputError, match="state folder"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cfg = BamConfig(train=train_cfg(tiny_lm, tmp_path / "bam", "full"), branches=2, rounds=1)
    with output_lock(cfg.work_dir, "BaM work folder"), pytest.raises(OutputError, match="BaM work folder"):
        run_bam(cfg)


def test_extract_apply_and_train_outputs_are_locked(llama_family, tiny_lm, tmp_path):  # noqa: F811
    from deltawise.adapt import run_train
    from deltawise.delta.apply import apply_delta
    from deltawise.delta.extract import extract_delta
    from deltawise.io.output import output_lock

    delta = tmp_path / "delta"
    extract_delta(str(llama_family["ft1"]), str(llama_family["base"]), delta)
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputError, match="another deltawise run"):
            extract_delta(str(llama_family["ft1"]), str(llama_family["base"]), out)
        with pytest.raises(OutputError, match="another deltawise run"):
            apply_delta(str(delta), str(llama_family["base"]), out)
        with pytest.raises(OutputError, match="another deltawise run"):
            run_train(train_cfg(tiny_lm, out, "lora"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]  # no output, staging folder or lock file left


# --- failure 7: pickle checkpoints only with --allow-pickle ---------------------------------------------------------

def test_train_refuses_a_pickle_checkpoint_without_allow_pickle(tiny_lm, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from deltawise.adapt import run_train

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_lm["model"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_lm["model"] / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="--allow-pickle"):
        run_train(train_cfg(tiny_lm, tmp_path / "out", "lora", model=folder))
    assert not (tmp_path / "out").exists()
    result = run_train(train_cfg(tiny_lm, tmp_path / "out", "lora", model=folder, allow_pickle=True))
    assert result.steps == 1


# --- weak spots ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupt_prints_the_resume_message_and_exits_130(tmp_path, how):
    stop = "raise KeyboardInterrupt" if how == "ctrl-c" else "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)"
    prelude = textwrap.dedent(f"""
        import os, signal, time
        import deltawise.merge
        def stop(*args, **kwargs):
            {stop}
        deltawise.merge.load_recipe = stop
    """).replace("\n", "\n        ")
    proc = run_cli(["merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "out"), "-q"], prelude=prelude)
    assert proc.returncode == 130
    assert "interrupted" in proc.stderr and "--resume" in proc.stderr


def interrupted_by_full_disk(family: dict[str, Path], out: Path, monkeypatch) -> None:
    """A merge that stops with ENOSPC after its first shard: completed shards stay for --resume."""
    real_pwrite = os.pwrite

    def full_disk(fd, data, offset):
        if len(data) > 1000 and list(staging_folder(out).glob("model-*.safetensors")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", full_disk)
    with pytest.raises(OutputError, match="disk full"):
        merge(linear_recipe(family, 0.5), out, threads=1, shard_size=140_000)
    monkeypatch.setattr(writer_module.os, "pwrite", real_pwrite)
    assert list(staging_folder(out).glob("model-*.safetensors"))


def test_resume_after_a_full_disk_needs_room_only_for_what_is_left(race_family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted_by_full_disk(race_family, out, monkeypatch)
    whole = sum(p.stat().st_size for p in race_family["ft1"].glob("*.safetensors"))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * whole, 9 * whole, whole - 100_000))
    merge(linear_recipe(race_family, 0.5), out, threads=1, shard_size=140_000, resume=True)
    assert verify_folder(out).ok


def test_resume_with_another_shard_size_says_so(race_family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted_by_full_disk(race_family, out, monkeypatch)
    with pytest.raises(OutputError, match="shard-size") as refused_resume:
        merge(linear_recipe(race_family, 0.5), out, threads=1, shard_size=300_000, resume=True)
    assert "different recipe" not in str(refused_resume.value)


def test_disk_space_message_prints_human_sizes(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 5_000_000, 5_000_000))
    with pytest.raises(OutputError, match=r"needs 14\.0 MB, 5\.0 MB free"):
        check_output_folder(tmp_path / "out", [], overwrite=False, need_bytes=14_000_000)


def test_a_read_only_output_file_system_gets_a_clear_message(race_family, tmp_path, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_open, real_mkdir = os.open, Path.mkdir

    def no_write_open(path, flags, *args, **kwargs):
        if Path(path).parent == read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    def no_mkdir(self, *args, **kwargs):
        if self.parent == read_only:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_write_open)
    monkeypatch.setattr(Path, "mkdir", no_mkdir)
    with pytest.raises(OutputError, match="read-only file system"):
        merge(linear_recipe(race_family, 0.5), read_only / "out", threads=1)
    assert list(read_only.iterdir()) == []


def test_train_with_zero_epochs_is_refused(tiny_lm, tmp_path):  # noqa: F811
    from deltawise.adapt import run_train

    before = tree_digest(tiny_lm["model"])
    with pytest.raises(InputError, match="--epochs"):
        run_train(train_cfg(tiny_lm, tmp_path / "out", "lora", epochs=0, max_steps=-1))
    assert not (tmp_path / "out").exists() and tree_digest(tiny_lm["model"]) == before


def test_a_staged_output_written_by_another_run_after_the_check_is_not_replaced(tmp_path):
    """apply / extract --lora / bam check OUT, work, then take the lock: a run that finished in between must not be
    replaced without --overwrite (the check is repeated under the lock)."""
    from deltawise.io.output import staged_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the other run's result")  # appeared after this run's first check
    with pytest.raises(OutputError, match="written by another run meanwhile"):
        with staged_output(out, overwrite=False) as staging:
            (staging / "x").write_text("mine")
    assert (out / "model.safetensors").read_bytes() == b"the other run's result"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder or lock file left behind
    with staged_output(out, overwrite=True) as staging:  # --overwrite replaces it, once the new one is complete
        (staging / "x").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["x"]
