"""benchmarks/bam_round_speed.py: the flags each executor gets (two branches share one GPU on Ray), the order the
runs take turns in, the model comparison the equality column reports, and the medians and ratios of the summary."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bam_round_speed import change_size, executor_args, max_abs_difference, schedule, summarise  # noqa: E402


def test_each_executor_gets_its_flags_and_ray_branches_share_one_gpu():
    assert executor_args("inline", "cpu", 1) == ["--executor", "inline"]
    assert executor_args("local", "cuda", 8) == ["--executor", "local", "--jobs", "2"]
    assert executor_args("ray", "cpu", 1) == ["--executor", "ray", "--branch-cpus", "1"]
    assert executor_args("ray", "cuda", 8) == ["--executor", "ray", "--branch-cpus", "8", "--branch-gpus", "0.5"]
    with pytest.raises(ValueError, match="unknown executor"):
        executor_args("slurm", "cpu", 1)


def test_runs_take_turns_executor_by_executor():
    order = schedule(["inline", "local", "ray"], 2)
    assert [name for _, name in order] == ["inline", "local", "ray", "inline", "local", "ray"]
    assert [rep for rep, _ in order] == [1, 1, 1, 2, 2, 2]


def _model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_models_are_compared_over_every_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    b = {"w": a["w"].clone(), "b": a["b"].clone()}
    b["b"][1] += 3e-6
    b["w"][2, 0] -= 1e-7
    diff, where = max_abs_difference(_model(tmp_path / "a", a), _model(tmp_path / "b", b))
    assert where == "b"
    assert diff == pytest.approx((b["b"][1].double() - a["b"][1].double()).abs().item(), rel=1e-12)
    assert max_abs_difference(tmp_path / "a", _model(tmp_path / "c", {k: v.clone() for k, v in a.items()})) == (0.0, "")


def test_models_with_other_tensors_are_refused_and_the_change_skips_what_the_base_lacks(tmp_path):
    w = torch.ones(2, 2)
    merged = _model(tmp_path / "merged", {"w": w + 0.25, "lm_head": w * 9})
    with pytest.raises(ValueError, match="different tensors .*lm_head"):
        max_abs_difference(merged, _model(tmp_path / "other", {"w": w}))
    assert change_size(merged, tmp_path / "other") == pytest.approx(0.25)


def _run(name: str, wall: float, cpu: float, ok: bool = True, **diffs: float) -> dict:
    return {"executor": name, "ok": ok, "wall_s": wall, "cpu_s": cpu, "cpu_rusage_s": cpu / 2, "peak_rss_gb": 1.0,
            "branch_s": [wall / 3, wall / 4], "diffs": {k: (v, "w") for k, v in diffs.items()}}


def test_summary_takes_medians_of_finished_runs_and_ratios_to_inline():
    runs = [_run("inline", 100, 150), _run("local", 90, 170, inline=1e-6), _run("ray", 130, 200, inline=2e-6, local=0.0),
            _run("inline", 120, 160, inline=0.0), _run("local", 80, 180, inline=3e-6, local=0.0),
            _run("ray", 500, 900, ok=False)]
    s = summarise(runs, ["inline", "local", "ray"])
    assert s["inline"]["wall_s"] == statistics.median([100, 120]) and s["inline"]["wall_ratio"] == 1.0
    assert s["local"]["wall_ratio"] == pytest.approx(statistics.median([90, 80]) / statistics.median([100, 120]))
    assert s["local"]["cpu_ratio"] == pytest.approx(statistics.median([170, 180]) / statistics.median([150, 160]))
    assert s["ray"]["runs"] == 1 and s["ray"]["wall_s"] == 130  # the failed run is left out
    assert s["local"]["max_abs_diff"] == {"inline": 3e-6, "local": 0.0}  # the largest over the runs
    assert s["inline"]["max_abs_diff"] == {"inline": 0.0} and "ray" not in s["ray"]["max_abs_diff"]
    assert summarise([_run("inline", 1, 1, ok=False)], ["inline"]) == {"inline": None}
