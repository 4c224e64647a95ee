"""Branch-and-Merge: disjoint slices, the round loop against a hand recomputation of every merge,
adapters folded into full models, and resuming an interrupted run bit for bit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapt_util import DOCS, base_model, batch_of, logits, tiny_lm  # noqa: F401
from typer.testing import CliRunner

from conftest import load_state, tree_digest
from deltawise.adapt.bam import merge_recipe, split_slices
from deltawise.cli import app
from deltawise.errors import InputError

K, R = 2, 2


def bam_args(tiny_lm, data: Path, out: Path, *extra: str) -> list[str]:
    return ["bam", str(tiny_lm["model"]), "--data", str(data), "-o", str(out), "-k", str(K), "-r", str(R), "--merge", "linear",
            "--method", "full", "--max-steps", "1", "--batch-size", "2", "--lr", "1e-2", "--warmup", "0", "--max-length", "32",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def bam_data(tiny_lm) -> Path:
    docs = [f"{d} Item {i}." for i, d in enumerate(DOCS + DOCS[:4])]  # 12 distinct documents
    path = tiny_lm["root"] / "bam_data.txt"
    path.write_text("\n%\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="module")
def bam_run(tiny_lm, bam_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bam") / "out"
    res = CliRunner().invoke(app, bam_args(tiny_lm, bam_data, out))
    assert res.exit_code == 0, res.output
    return out


def test_slices_are_disjoint_seeded_and_cover_the_data():
    slices = split_slices(10, 4, seed=3)
    flat = [i for s in slices for i in s]
    assert sorted(flat) == list(range(10)) and [len(s) for s in slices] == [2, 3, 2, 3]
    assert split_slices(10, 4, seed=3) == slices and split_slices(10, 4, seed=4) != slices
    with pytest.raises(InputError, match="fewer than the 4 slices"):
        split_slices(3, 4, seed=0)


def test_fingerprint_holds_resolved_method_params(tiny_lm, bam_data, tmp_path):
    """A parameter given at its default value (as text) is the same run; another value or method is not."""
    from deltawise.adapt import MethodError, TrainConfig
    from deltawise.adapt.bam import BamConfig, fingerprint

    def key(method: str, params: dict) -> dict:
        train = TrainConfig(model=tiny_lm["model"], data=bam_data, output=tmp_path / "o", method=method, method_params=params)
        return fingerprint(BamConfig(train=train), tiny_lm["model"])

    default = key("hft", {})
    assert default["train"]["method_params"] == {"ratio": 0.5}
    assert key("hft", {"ratio": "0.5"}) == default and key("hft", {"ratio": "0.25"}) != default
    with pytest.raises(MethodError, match="hft has no parameter 'rank'"):
        key("hft", {"rank": "4"})


def test_round_recipes_follow_the_merge_method():
    start, b = Path("start"), [Path("b1"), Path("b2")]
    slerp = merge_recipe("slerp", {"t": 0.5}, start, b, 0)
    assert slerp["base_model"] == "b1" and slerp["models"] == [{"model": "b2"}]  # branch 1 -> branch 2, t = 0.5
    ta = merge_recipe("task_arithmetic", {"lambda": 0.5}, start, b, 0)
    assert ta["base_model"] == "start" and [m["model"] for m in ta["models"]] == ["b1", "b2"]  # task vectors vs the round's start
    lin = merge_recipe("linear", {}, start, b + [Path("b3")], 0)
    assert "base_model" not in lin and len(lin["models"]) == 3


def test_bam_loop_trains_k_times_r_branches_on_disjoint_slices_and_merges_each_round(bam_run, bam_data, tiny_lm):
    from deltawise.adapt.data import read_examples

    work = bam_run.parent / "out.work"
    examples = [e.text for e in read_examples(bam_data)]
    seen: list[int] = []
    for j in (1, 2):
        start = tiny_lm["model"] if j == 1 else work / "round_1" / "merged"
        branches = []
        for k in (1, 2):
            bdir = work / f"round_{j}" / f"branch_{k}"
            done = json.loads((bdir / "done.json").read_text())
            assert done["slice"] == (j - 1) * K + k and done["steps"] == 1 and done["tokens"] > 0 and math.isfinite(done["loss"])
            # the branch trained on exactly its slice, starting from the round's start model
            assert ([json.loads(line)["text"] for line in (bdir / "data.jsonl").read_text().splitlines()]
                    == [examples[i] for i in done["indices"]])
            assert Path(json.loads((bdir / "train" / "deltawise_train.json").read_text())["base_model"]) == start
            seen += done["indices"]
            branches.append(load_state(bdir / "train"))
        start_state = load_state(start)
        assert all(not torch.equal(b["model.layers.0.mlp.up_proj.weight"], start_state["model.layers.0.mlp.up_proj.weight"])
                   for b in branches)
        merged = load_state(work / f"round_{j}" / "merged" if j == 1 else bam_run)
        assert set(merged) == set(branches[0])
        for name, value in merged.items():  # linear merge, by hand: (θ_j1 + θ_j2) / 2 in float32
            assert torch.equal(value, (branches[0][name] + branches[1][name]) / 2), name
    assert sorted(seen) == list(range(len(examples)))  # K·R disjoint slices covering the data
    log = json.loads((bam_run / "bam.json").read_text())
    assert [len(r["branches"]) for r in log["rounds_log"]] == [K, K] and log["merge"]["method"] == "linear"
    assert all(not b["skipped"] and b["seconds"] > 0 for r in log["rounds_log"] for b in r["branches"])


# The CLI in a child process with a watcher thread that sends SIGTERM to the process as soon as
# the first branch's done marker exists: the interruption lands while branch 2 is being set up
# or trained, through the CLI's own SIGTERM handler.
INTERRUPT_AFTER_FIRST_BRANCH = """
import os, signal, sys, threading, time
from pathlib import Path
marker = Path(sys.argv[1])
def watch():
    while not marker.exists():
        time.sleep(0.002)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
from deltawise.cli import main
sys.argv = ["deltawise", *sys.argv[2:]]
main()
"""


def test_interrupted_bam_resumes_without_retraining_and_matches_an_uninterrupted_run(bam_run, bam_data, tiny_lm, tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "out.work"
    first = work / "round_1" / "branch_1"
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_AFTER_FIRST_BRANCH, str(first / "done.json"),
                           *bam_args(tiny_lm, bam_data, out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert not out.exists() and not (work / "round_1" / "branch_2" / "done.json").exists()
    digest = tree_digest(first)
    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}

    res = CliRunner().invoke(app, bam_args(tiny_lm, bam_data, out))
    assert res.exit_code == 0, res.output
    assert tree_digest(first) == digest and {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == mtimes
    log = json.loads((out / "bam.json").read_text())
    assert [[b["skipped"] for b in r["branches"]] for r in log["rounds_log"]] == [[True, False], [False, False]]
    ours, reference = load_state(out), load_state(bam_run)
    assert set(ours) == set(reference) and all(torch.equal(ours[n], reference[n]) for n in reference)  # bit for bit

    # the same work folder with other options is refused (nothing is retrained or deleted)
    res = CliRunner().invoke(app, bam_args(tiny_lm, bam_data, tmp_path / "other", "--work", str(work), "--lr", "2e-2"))
    assert res.exit_code != 0 and "changed: lr" in str(res.exception) and tree_digest(first) == digest


def test_adapter_branches_are_folded_into_full_models_and_slerped(tiny_lm, bam_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "out"
    args = ["bam", str(tiny_lm["model"]), "--data", str(bam_data), "-o", str(out), "-k", "2", "-r", "1", "--method", "lora",
            "--rank", "2", "--max-steps", "1", "--batch-size", "2", "--lr", "5e-2", "--warmup", "0", "--max-length", "32",
            "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    branch = tmp_path / "out.work" / "round_1" / "branch_1"
    batch = batch_of(tiny_lm)
    adapter = PeftModel.from_pretrained(base_model(tiny_lm["model"]), branch / "train")
    folded = base_model(branch / "model")
    assert not torch.allclose(logits(folded, batch), logits(base_model(tiny_lm["model"]), batch), atol=1e-4)
    torch.testing.assert_close(logits(folded, batch), logits(adapter, batch), atol=1e-5, rtol=1e-5)
    # default merge for K = 2: SLERP t = 0.5 from branch 1 to branch 2, checked on one tensor by hand
    v0 = load_state(branch / "model")["model.layers.0.self_attn.q_proj.weight"].double()
    v1 = load_state(branch.parent / "branch_2" / "model")["model.layers.0.self_attn.q_proj.weight"].double()
    d = float((v0 * v1).sum() / (v0.norm() * v1.norm()))
    omega = math.acos(d)
    expected = 0.5 * (v0 + v1) if d > 0.9995 else math.sin(0.5 * omega) / math.sin(omega) * (v0 + v1)
    torch.testing.assert_close(load_state(out)["model.layers.0.self_attn.q_proj.weight"].double(), expected, atol=1e-6, rtol=1e-6)
    assert json.loads((out / "bam.json").read_text())["merge"] == {"method": "slerp", "parameters": {"t": 0.5}}


def test_branch_index_trains_one_branch_and_merge_only_merges_when_all_are_done(tiny_lm, bam_data, tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "out.work" / "round_1"

    def run(*extra: str):
        args = ["bam", str(tiny_lm["model"]), "--data", str(bam_data), "-o", str(out), "-k", "2", "-r", "1", "--merge", "linear",
                "--max-steps", "1", "--batch-size", "2", "--lr", "1e-2", "--warmup", "0", "--max-length", "32", "--quiet", *extra]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output

    run("--branch-index", "2")
    assert (work / "branch_2" / "done.json").is_file() and not (work / "branch_1").exists()
    run("--merge-only")  # branch 1 is missing: nothing merged, nothing written
    assert not (work / "merged").exists() and not out.exists()
    run("--branch-index", "1")
    run("--merge-only")
    assert json.loads((work / "branch_2" / "done.json").read_text())["seed"] == 1  # seed + branch number - 1
    b1, b2, merged = load_state(work / "branch_1" / "train"), load_state(work / "branch_2" / "train"), load_state(out)
    assert all(torch.equal(merged[n], (b1[n] + b2[n]) / 2) for n in merged)
