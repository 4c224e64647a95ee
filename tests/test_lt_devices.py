"""benchmarks/lt_devices.py: a run recorded on both the CPU and a GPU, its perplexities compared item by item."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lt_devices  # noqa: E402
import records  # noqa: E402


def record(nll: list[float], tokens: list[int], name: str = "english_prose") -> dict:
    items = {str(i): v for i, v in enumerate(nll)}
    dataset = {"name": name, "role": "source", "task": "perplexity", "path": f"{name}.jsonl", "metric": "perplexity",
               "value": math.exp(sum(nll) / sum(tokens)), "higher_is_better": False, "per_item_nll": items,
               "per_item_tokens": {str(i): t for i, t in enumerate(tokens)}}
    result = {"schema": "deltawise.eval/1", "model": "m", "fingerprint": "f", "created": "now", "datasets": [dataset]}
    return {"settings": {}, "files": {"eval.json": result}}


def test_the_ratio_is_the_cpu_perplexity_over_the_gpu_one_with_its_paired_interval():
    tokens = [3, 5, 2, 7]
    cpu = record([2.0 * t for t in tokens], tokens)
    gpu = record([(2.0 - math.log(1.1)) * t for t in tokens], tokens)  # every token 10% more likely on the GPU
    found = lt_devices.compare(cpu, gpu)
    point, (low, high) = found["english_prose"]
    assert point == pytest.approx(1.1) and low == pytest.approx(1.1) and high == pytest.approx(1.1)
    noisy = record([2.0 * tokens[0] - 0.5, 2.0 * tokens[1] + 0.5, *[2.0 * t for t in tokens[2:]]], tokens)
    point, (low, high) = lt_devices.compare(cpu, noisy)["english_prose"]
    assert point == pytest.approx(1.0) and low < 1.0 < high  # item-level differences that cancel


def test_the_table_lists_the_runs_recorded_on_both_devices(tmp_path):
    tokens = [4, 4]
    records.save_record(records.record_file("language_transfer_long", "full_s0", tmp_path), record([8.0, 8.0], tokens))
    records.save_record(records.record_file("language_transfer_long/cuda", "full_s0", tmp_path), record([8.0, 8.0], tokens))
    records.save_record(records.record_file("language_transfer_long/cuda", "lora_s0", tmp_path), record([8.0, 8.0], tokens))
    shown = lt_devices.table(tmp_path)
    assert shown.columns[0]._cells == ["full_s0"]  # lora_s0 has no CPU record
    assert shown.columns[1]._cells == ["1.0000 [1.0000, 1.0000]"]
