"""CPU and wall seconds of deltawise's start, for two source trees measured in turn (issue 19, "fast start").

    python benchmarks/start_cpu.py --tree before=/tmp/old/src --tree after=src [--repeats 7] [--cases CASE,...]

Each case runs in a fresh interpreter with ``PYTHONPATH`` set to the tree; the trees take turns case by
case and repeat by repeat (a shared machine's load drifts), after one uncounted warm-up of each (the
bytecode cache). Cases: ``import torch`` alone (the floor every command that touches tensors pays),
``import deltawise.merge`` (the library), ``deltawise --help``, ``deltawise merge --help`` and a whole
linear ``deltawise merge`` of two tiny safetensors models through the console entry point
(``deltawise.launch:main``), whose start is all there is. CPU = user + system of the child process.
Prints medians and min-max per case and tree.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENTRY = "import sys; sys.argv = ['deltawise', *sys.argv[1:]]; from deltawise.launch import main; main()"


def tiny_inputs(root: Path) -> Path:
    """Two 2-tensor safetensors models and a linear recipe over them; returns the recipe."""
    import torch
    from safetensors.torch import save_file

    for i in range(2):
        folder = root / f"m{i}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"a.weight": torch.full((64, 64), float(i)), "b.bias": torch.full((64,), float(i))},
                  str(folder / "model.safetensors"))
    recipe = root / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {root / 'm0'}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {root / 'm1'}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    return recipe


def cases(recipe: Path, out: Path) -> dict[str, list[str]]:
    return {
        "import torch": ["-c", "import torch"],
        "import deltawise.merge": ["-c", "import deltawise.merge"],
        "deltawise --help": ["-c", ENTRY, "--help"],
        "deltawise merge --help": ["-c", ENTRY, "merge", "--help"],
        "deltawise merge (tiny)": ["-c", ENTRY, "merge", str(recipe), str(out), "--overwrite", "-q"],
    }


def run_once(src: str, args: list[str]) -> tuple[float, float]:
    """(CPU s, wall s) of one fresh interpreter running ``args`` with ``src`` first on the path."""
    env = {**os.environ, "PYTHONPATH": src}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=SRC_FOLDER (twice or more)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default="", help="comma-separated case names to run (default: all)")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = tiny_inputs(Path(tmp))
        table = cases(recipe, Path(tmp) / "out")
        if args.cases:
            table = {case: table[case] for case in args.cases.split(",")}
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for case, argv in table.items():
            for src in trees.values():
                run_once(src, argv)  # warm-up: bytecode cache, page cache
            for _ in range(args.repeats):
                for name, src in trees.items():
                    results.setdefault((case, name), []).append(run_once(src, argv))
    print(f"{args.repeats} runs per case and tree, alternating; load average {os.getloadavg()[0]:.1f} at the end")
    print("| case | tree | CPU s median (min-max) | wall s median |")
    print("|---|---|---|---|")
    for (case, name), runs in results.items():
        cpu = [c for c, _ in runs]
        print(f"| {case} | {name} | {statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f}) | "
              f"{statistics.median(w for _, w in runs):.3f} |")


if __name__ == "__main__":
    main()
