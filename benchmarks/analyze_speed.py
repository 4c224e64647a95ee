"""Time ``analyze weights`` (intruder dimensions) with the exact float64 SVDs and the fast Gram path, on the same inputs.

The base is a real model folder (default: SmolLM2-135M as the demo downloads it into ~/.cache/deltawise/gguf/);
three fine-tunes are written next to it as base + a seeded low-rank perturbation + seeded noise on every
linear weight, with the low-rank part at three strengths (small: no intruders expected; large: intruders).
Both runs read the same folders; the script prints the times, their ratio, and how far the fast path's
numbers are from the exact ones (counts must be equal).

    python benchmarks/analyze_speed.py [--base DIR] [--work DIR] [--k 5] [--skip-exact] [--layers 0,15,29]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltawise.analyze.weights import WeightsOptions, analyze_weights

# (rank, strength as a fraction of the matrix's largest singular value, noise as a fraction of its entry std)
FINE_TUNES = {"ft-small": (8, 0.05, 0.01), "ft-medium": (8, 0.5, 0.01), "ft-large": (4, 1.5, 0.02)}


def default_base() -> Path:
    found = sorted(glob.glob(os.path.expanduser("~/.cache/deltawise/gguf/*/model.safetensors")))
    if not found:
        raise SystemExit("no SmolLM2-135M in ~/.cache/deltawise/gguf/: run the demo once, or pass --base")
    return Path(found[0]).parent


def spectral_norm(w: torch.Tensor, gen: torch.Generator, steps: int = 30) -> float:
    """The largest singular value, by power iteration (a full SVD per matrix would cost as much as the analysis)."""
    v = torch.randn(w.shape[1], generator=gen, dtype=w.dtype)
    for _ in range(steps):
        v = w.T @ (w @ v)
        v /= v.norm()
    return float((w @ v).norm())


def write_fine_tunes(base: Path, work: Path) -> list[Path]:
    """Each fine-tune is one safetensors file plus the base's config; rewritten only when missing."""
    state = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(f).items()}
    outs = []
    for seed, (name, (rank, strength, noise)) in enumerate(FINE_TUNES.items()):
        out = work / name
        outs.append(out)
        if (out / "model.safetensors").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed)
        ft = {}
        for key, w in state.items():
            if w.ndim == 2 and "layers." in key:
                w64 = w.double()
                top = spectral_norm(w64, gen)
                a = torch.randn(w.shape[0], rank, generator=gen, dtype=torch.float64)
                b = torch.randn(rank, w.shape[1], generator=gen, dtype=torch.float64)
                low_rank = a @ b
                low_rank *= strength * top / torch.linalg.matrix_norm(torch.linalg.qr(a).R @ b, ord=2)  # ||a b|| = ||R b||
                jitter = noise * w64.std() * torch.randn(w.shape, generator=gen, dtype=torch.float64)
                ft[key] = (w64 + low_rank + jitter).to(w.dtype)
            else:
                ft[key] = w.clone()
        save_file(ft, str(out / "model.safetensors"))
        for extra in base.iterdir():
            if extra.suffix != ".safetensors" and extra.is_file():
                shutil.copy(extra, out / extra.name)
    return outs


def run(base: Path, models: list[Path], k: int, method: str) -> tuple[float, dict]:
    start, start_cpu = time.perf_counter(), time.process_time()
    result = analyze_weights(str(base), [str(m) for m in models], WeightsOptions(k=k, intruder_method=method))
    print(f"  ({method}: {time.process_time() - start_cpu:.1f} s CPU)")
    return time.perf_counter() - start, result.model_dump(mode="json", by_alias=True)


def compare(exact: dict, fast: dict) -> dict:
    """Counts per (tensor, model), and the largest absolute differences of similarities and singular values."""
    count_mismatch, sim_diff, sv_rel_diff = [], 0.0, 0.0
    for te, tf in zip(exact["tensors"], fast["tensors"]):
        for ie, i_f in zip(te["intruders"] or [], tf["intruders"] or []):
            if ie["count"] != i_f["count"]:
                count_mismatch.append((te["name"], ie["model"], ie["count"], i_f["count"]))
            sim_diff = max([sim_diff] + [abs(a - b) for a, b in zip(ie["similarities"], i_f["similarities"])])
            spectra_exact = ie["singular_values"] + ie["base_singular_values"]
            pairs = list(zip(spectra_exact, i_f["singular_values"] + i_f["base_singular_values"]))
            sv_rel_diff = max([sv_rel_diff] + [abs(a - b) / max(abs(a), 1e-30) for a, b in pairs])
    return {"count_mismatches": count_mismatch, "max_abs_similarity_diff": sim_diff, "max_rel_singular_value_diff": sv_rel_diff}


def per_layer(base: Path, models: list[Path], k: int, layers: list[int]) -> None:
    """The intruder computation alone, both methods on the same matrices of the given layers (for a loaded machine,
    where the whole exact run takes too long): times, counts and differences."""
    from deltawise.analyze.intruders import base_singular, intruder_dimensions, is_analysed_matrix
    from deltawise.io.reader import ModelReader

    readers = [ModelReader(p) for p in [base, *models]]
    names = [n for n in readers[0].keys() if any(f"layers.{i}." in n for i in layers)
             and is_analysed_matrix(n, tuple(readers[0].info(n).shape))]
    seconds = {"fast": 0.0, "exact": 0.0}
    cpu = {"fast": 0.0, "exact": 0.0}  # process CPU time: on a shared machine, steadier than wall time
    counts: dict[str, list[int]] = {"fast": [], "exact": []}
    sim_diff, sv_diff = 0.0, 0.0
    for name in names:
        w0, *fts = [r.get(name).float() for r in readers]
        got = {}
        for method in ("fast", "exact"):
            start, start_cpu = time.perf_counter(), time.process_time()
            svd = base_singular(w0, "left", method)
            got[method] = [intruder_dimensions(w0, ft, k=k, base_svd=svd, method=method) for ft in fts]
            seconds[method] += time.perf_counter() - start
            cpu[method] += time.process_time() - start_cpu
            counts[method] += [r.count for r in got[method]]
        for f, e in zip(got["fast"], got["exact"]):
            sim_diff = max([sim_diff] + [abs(a - b) for a, b in zip(f.similarities, e.similarities)])
            sv_diff = max([sv_diff] + [abs(a - b) / b for a, b in zip(f.singular_values + f.base_singular_values,
                                                                      e.singular_values + e.base_singular_values)])
    print(f"layers {layers}: {len(names)} matrices x {len(models)} models, k={k}")
    for method in ("fast", "exact"):
        print(f"  {method:5}: {seconds[method]:7.2f} s wall, {cpu[method]:7.2f} s CPU, intruders {sum(counts[method])}")
    print(f"  ratio exact/fast {seconds['exact'] / seconds['fast']:.1f}x wall, {cpu['exact'] / cpu['fast']:.1f}x CPU; "
          f"counts equal: {counts['fast'] == counts['exact']}; "
          f"max |similarity diff| {sim_diff:.2e}; max relative singular value diff {sv_diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/deltawise-analyze-speed"))
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices: time the intruder part only")
    args = parser.parse_args()
    base = args.base or default_base()
    models = write_fine_tunes(base, args.work)
    if args.layers:
        per_layer(base, models, args.k, [int(i) for i in args.layers.split(",")])
        return
    print(f"base {base}; fine-tunes {[m.name for m in models]}; k={args.k}; torch threads {torch.get_num_threads()}")
    fast_s, fast = run(base, models, args.k, "fast")
    print(f"fast : {fast_s:7.1f} s  intruders {[(m['model'], m['intruders']) for m in fast['summary']['models']]}")
    (args.work / "fast.json").write_text(json.dumps(fast))
    if args.skip_exact:
        return
    exact_s, exact = run(base, models, args.k, "exact")
    print(f"exact: {exact_s:7.1f} s  intruders {[(m['model'], m['intruders']) for m in exact['summary']['models']]}")
    (args.work / "exact.json").write_text(json.dumps(exact))
    print(f"ratio exact/fast: {exact_s / fast_s:.1f}x")
    print(json.dumps(compare(exact, fast), indent=1))


if __name__ == "__main__":
    main()
