"""How much the device moves the long language-transfer benchmark's results: every run recorded both on the CPU and on
a GPU, its perplexity on each evaluation set compared item by item (benchmarks/records/language_transfer_long/ and its
cuda/ folder; lt_records.record_folder).

    .venv/bin/python benchmarks/lt_devices.py

For each run (and the base) and set: ppl on the CPU / ppl on the GPU, with a 95% paired bootstrap interval over
items (deltawise.eval.intervals, seeded). The base's evaluation differs only in rounding; a trained run differs
because a GPU's arithmetic takes another path through training. This is why lt_records keeps the two apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

import records  # noqa: E402
from lt_records import BENCHMARK, record_folder  # noqa: E402

SETS = ("english_prose", "german")


def datasets(record: dict) -> dict:
    """The record's evaluation sets (``DatasetResult``s) by name: a run's eval.json or the base's base.json."""
    from deltawise.eval.results import EvalResult

    files = record["files"]
    result = files.get("eval.json") or files.get("base.json")
    return {} if result is None else {d.name: d for d in EvalResult.model_validate(result).datasets}


def compare(cpu: dict, gpu: dict, settings=None) -> dict[str, tuple[float, Optional[tuple[float, float]]]]:
    """ppl on the CPU / ppl on the GPU per perplexity set both records hold, with its paired interval."""
    from deltawise.eval.intervals import IntervalSettings, draws, paired_sample, percentile

    settings = settings or IntervalSettings()
    on_cpu, on_gpu = datasets(cpu), datasets(gpu)
    out = {}
    for name in SETS:
        if name not in on_cpu or name not in on_gpu:
            continue
        sample = paired_sample(on_gpu[name], on_cpu[name])  # the GPU's run as the model, the CPU's as its baseline
        if sample is None or sample.kind != "perplexity":
            continue
        point = float(sample.replicates(np.arange(len(sample.base))[None, :])["ratio"][0])
        interval = percentile(sample.replicates(draws(len(sample.base), settings, 0))["ratio"], settings.level)
        out[name] = (point, None if interval is None else (float(interval[0]), float(interval[1])))
    return out


def table(root: Optional[Path] = None) -> Table:
    cpu_folder = records.record_file(record_folder("cpu"), "x", root).parent
    gpu_folder = records.record_file(record_folder("cuda"), "x", root).parent
    shown = Table(title="the device's effect: ppl on the CPU / ppl on the GPU, same run, same items")
    for column in ("run", *SETS):
        shown.add_column(column)
    for gpu_file in sorted(gpu_folder.glob("*.json")):
        cpu_file = cpu_folder / gpu_file.name
        if not cpu_file.is_file():
            continue
        found = compare(json.loads(cpu_file.read_text()), json.loads(gpu_file.read_text()))
        cells = [f"{found[n][0]:.4f} [{found[n][1][0]:.4f}, {found[n][1][1]:.4f}]" if n in found and found[n][1] else ""
                 for n in SETS]
        shown.add_row(gpu_file.stem, *cells)
    shown.caption = f"records: {cpu_folder} and {gpu_folder}; > 1: the GPU's run has the lower perplexity"
    return shown


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=Path, default=None, help=f"the records folder (default: benchmarks/records; "
                                                                 f"{BENCHMARK}/ and {BENCHMARK}/cuda/ inside it)")
    args = ap.parse_args(argv)
    Console(width=140).print(table(args.records))


if __name__ == "__main__":
    main()
