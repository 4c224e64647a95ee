"""Interrupted merges resume to bit-identical output; damaged outputs are caught by verify;
a full disk or inputs changing mid-merge leave nothing under the output name."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import noisy_family, tree_digest
from deltawise.errors import InputError, OutputError
from deltawise.io import writer as writer_module
from deltawise.io.verify import verify_folder
from deltawise.merge import merge
from deltawise.merge.staging import staging_folder

SHARD = 2_100_000  # bytes: about two 1 MB tensors per shard


@pytest.fixture(scope="module")
def big_family(tmp_path_factory) -> dict[str, Path]:
    """Base + 2 models, 24 tensors of 512x512 float32 (1 MB each): merges take long enough to interrupt."""
    return noisy_family(tmp_path_factory.mktemp("big"), 24, 512)


def write_recipe(path: Path, family: dict[str, Path], **params) -> Path:
    recipe = {"merge_method": "ties", "base_model": str(family["base"]),
              "models": [{"model": str(family[m])} for m in ("ft1", "ft2")],
              "parameters": {"density": 0.3, **params}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltawise", "merge", *args, "--quiet", "--threads", "1", "--shard-size", str(SHARD)]


# Runs the merge in a child process that signals itself as soon as the first shard is complete:
# a deterministic interruption, whatever the machine's load. SIGTERM goes through the CLI's own
# handler, exactly as `deltawise merge` installs it.
SELF_INTERRUPT = """
import os, signal, sys
from pathlib import Path
from deltawise.cli import _terminate
from deltawise.merge import merge
from deltawise.merge.staging import staging_folder
recipe, out, sig, shard = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
signal.signal(signal.SIGTERM, _terminate)
def progress(stage, done, total):
    if list(staging_folder(out).glob("model-*.safetensors")):
        os.kill(os.getpid(), sig)
try:
    merge(recipe, out, threads=1, shard_size=shard, progress=progress)
except KeyboardInterrupt:
    sys.exit(130)
"""


def interrupt_after_first_shard(recipe: Path, out: Path, sig: int) -> int:
    proc = subprocess.run([sys.executable, "-c", SELF_INTERRUPT, str(recipe), str(out), str(int(sig)), str(SHARD)],
                          capture_output=True, text=True, timeout=300)
    assert not out.exists(), f"the merge was not interrupted: {proc.stderr[-2000:]}"
    return proc.returncode


def completed_shards(out: Path) -> list[str]:
    return sorted(p.name for p in staging_folder(out).glob("model-*.safetensors"))


@pytest.fixture(scope="module")
def reference(big_family, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(root / "recipe.yaml", big_family)
    subprocess.run(cli(str(recipe), str(root / "out")), check=True)
    return root / "out"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_merge_resumes_to_identical_output(big_family, reference, tmp_path, sig):
    before = {k: tree_digest(v) for k, v in big_family.items()}
    recipe = write_recipe(tmp_path / "recipe.yaml", big_family)
    out = tmp_path / "out"
    code = interrupt_after_first_shard(recipe, out, sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    done = completed_shards(out)
    assert 1 <= len(done) < 12
    if sig == signal.SIGTERM:  # a graceful stop removes its partial files
        assert not list(staging_folder(out).glob(".*.partial"))
    with pytest.raises(OutputError, match="--resume"):
        merge(str(recipe), out, threads=1, shard_size=SHARD)
    merge(str(recipe), out, threads=2, shard_size=SHARD, resume=True)
    assert tree_digest(out) == tree_digest(reference)
    assert not staging_folder(out).exists()
    assert {k: tree_digest(v) for k, v in big_family.items()} == before


def test_resume_remerges_a_damaged_shard_and_refuses_another_recipe(big_family, reference, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", big_family)
    out = tmp_path / "out"
    interrupt_after_first_shard(recipe, out, signal.SIGKILL)
    first = staging_folder(out) / completed_shards(out)[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped
    first.write_bytes(bytes(data))
    other = write_recipe(tmp_path / "other.yaml", big_family, density=0.5)
    with pytest.raises(OutputError, match="different recipe"):
        merge(str(other), out, threads=1, shard_size=SHARD, resume=True)
    merge(str(recipe), out, threads=1, shard_size=SHARD, resume=True)
    assert tree_digest(out) == tree_digest(reference)


def test_restart_discards_an_interrupted_merge(big_family, reference, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", big_family)
    out = tmp_path / "out"
    interrupt_after_first_shard(recipe, out, signal.SIGKILL)
    merge(str(recipe), out, threads=1, shard_size=SHARD, restart=True)
    assert tree_digest(out) == tree_digest(reference)


def test_disk_full_leaves_nothing_under_the_output_name_then_resumes(big_family, reference, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "recipe.yaml", big_family)
    out = tmp_path / "out"
    real_pwrite, calls = os.pwrite, []

    def full_disk(fd, data, offset):
        calls.append(1)
        if len(calls) > 9:  # a few tensors fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", full_disk)
    with pytest.raises(OutputError, match="disk full"):
        merge(str(recipe), out, threads=1, shard_size=SHARD)
    assert not out.exists()
    assert not list(staging_folder(out).glob(".*.partial"))
    assert completed_shards(out), "completed shards are kept for --resume"
    monkeypatch.setattr(writer_module.os, "pwrite", real_pwrite)
    merge(str(recipe), out, threads=1, shard_size=SHARD, resume=True)
    assert tree_digest(out) == tree_digest(reference)


def test_an_input_changing_during_the_merge_is_detected(big_family, tmp_path):
    import shutil

    family = {k: Path(shutil.copytree(v, tmp_path / k)) for k, v in big_family.items()}
    recipe = write_recipe(tmp_path / "recipe.yaml", family)
    out = tmp_path / "out"
    touched = []

    def touch_input(stage, done, total):
        if not touched and stage == "merging":
            touched.append(1)
            target = family["ft2"] / "model.safetensors"
            os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))

    with pytest.raises(InputError, match="changed during the merge"):
        merge(str(recipe), out, threads=1, shard_size=SHARD, progress=touch_input)
    assert not out.exists() and not staging_folder(out).exists()


def test_verify_accepts_a_good_output_and_finds_damage(reference, tmp_path):
    import shutil

    assert verify_folder(reference).ok
    damaged = Path(shutil.copytree(reference, tmp_path / "damaged"))
    shards = sorted(damaged.glob("model-*.safetensors"))
    shards[0].write_bytes(shards[0].read_bytes()[:-100])  # truncated
    data = bytearray(shards[1].read_bytes())
    data[-5] ^= 0x01  # silently flipped bit: only the checksum can tell
    shards[1].write_bytes(bytes(data))
    shards[2].unlink()
    report = verify_folder(damaged)
    text = "\n".join(report.problems)
    assert "truncated" in text and shards[0].name in text
    assert f"{shards[1].name}: sha256 differs" in text
    assert shards[2].name in text and "missing" in text
    from typer.testing import CliRunner

    from deltawise.cli import app

    bad = CliRunner().invoke(app, ["verify", str(damaged)])
    assert bad.exit_code == 1 and "problem" in bad.output
    good = CliRunner().invoke(app, ["verify", str(reference)])
    assert good.exit_code == 0 and "verified" in good.output
