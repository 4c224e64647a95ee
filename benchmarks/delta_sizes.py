"""Size on disk and reconstruction error of each delta type on a tiny Llama.

What it measures
    A tiny random Llama base (hidden 64, 2 layers, float32) and three synthetic fine-tunes
    whose per-tensor change is "structured": a rank-8 part plus Gaussian noise carrying
    ``--noise`` of its norm (fine-tuning deltas are approximately low-rank with a dense
    tail). Task 1's delta is stored every way deltawise can store it; each result is
    applied to the base with ``apply_delta`` and compared with the fine-tune:

        error = sqrt(Σ_tensors ‖(applied − base) − (ft − base)‖²) / sqrt(Σ_tensors ‖ft − base‖²)

    "bytes on disk" is the sum of the file sizes in the output folder (headers and JSON
    included), "ratio" is the fine-tune's safetensors size over that. TALL stores three
    tasks in one folder: its row shows the folder size divided by 3 and task 1's error.

How to run it (from the repository root)
    PYTHONPATH=src .venv/bin/python benchmarks/delta_sizes.py [--noise 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def make_models(root: Path, noise: float, tasks: int = 3) -> tuple[Path, list[Path]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    base = state(root / "base")
    fts = []
    for t in range(1, tasks + 1):
        g = torch.Generator().manual_seed(t)
        ft = {}
        for name, w in base.items():
            if w.dim() == 2:
                structured = torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g)
                structured *= 0.01 * w.norm() / structured.norm()
                dense = torch.randn(w.shape, generator=g)
                delta = structured + dense * noise * structured.norm() / dense.norm()
            else:
                delta = 0.01 * torch.randn(w.shape, generator=g)
            ft[name] = (w + delta).contiguous()
        folder = root / f"task{t}"
        shutil.copytree(root / "base", folder)
        save_file(ft, folder / "model.safetensors", metadata={"format": "pt"})
        fts.append(folder)
    return root / "base", fts


def error(applied: Path, base: Path, ft: Path) -> float:
    a, b, f = state(applied), state(base), state(ft)
    num = sum(float(((a[k].double() - b[k].double()) - (f[k].double() - b[k].double())).norm() ** 2) for k in b)
    den = sum(float((f[k].double() - b[k].double()).norm() ** 2) for k in b)
    return math.sqrt(num / den)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", type=float, default=0.1, help="share of each delta's norm that is unstructured noise")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from deltawise.delta.apply import apply_delta
    from deltawise.delta.compress import compress_delta
    from deltawise.delta.extract import extract_delta
    from deltawise.delta.lora_extract import extract_lora
    from deltawise.delta.tall_compress import compress_tall

    root = args.workdir or Path(tempfile.mkdtemp(prefix="dw-delta-sizes-"))
    base, fts = make_models(root, args.noise)
    ft_bytes = (fts[0] / "model.safetensors").stat().st_size
    d = root / "d"
    d.mkdir()
    (root / "applied").mkdir()
    extract_delta(str(fts[0]), str(base), d / "dense_f64")  # exact (auto: float64 for float32 weights)
    for t, ft in enumerate(fts):
        extract_delta(str(ft), str(base), d / f"dense_f32_{t + 1}", dtype="float32")
    variants: list[tuple[str, str, Path, dict]] = [
        ("dense float64 (exact)", "dense", d / "dense_f64", {}),
        ("dense float32", "dense", d / "dense_f32_1", {}),
    ]
    for rank in (4, 8, 16):
        extract_lora(str(fts[0]), str(base), d / f"lora_r{rank}", rank=rank)
        variants.append((f"LoRA r={rank} (PEFT)", "lowrank", d / f"lora_r{rank}", {}))
    extract_lora(str(fts[0]), str(base), d / "lora_e90", energy=0.9)
    variants.append(("LoRA energy 0.9 (PEFT)", "lowrank", d / "lora_e90", {}))
    for density in (0.05, 0.1, 0.3):
        compress_delta(str(d / "dense_f32_1"), d / f"topk_{density}", method="topk", density=density)
        variants.append((f"top-k sparse k={density}", "sparse", d / f"topk_{density}", {}))
        compress_delta(str(d / "dense_f32_1"), d / f"compeft_{density}", method="compeft", density=density, alpha=1.0)
        variants.append((f"ComPEFT k={density} α=1", "ternary", d / f"compeft_{density}", {}))
    compress_tall([str(d / f"dense_f32_{t + 1}") for t in range(len(fts))], d / "tall", lambdas=[0.4])
    variants.append((f"TALL λ=0.4 ({len(fts)} tasks, per task)", "tall", d / "tall", {"task": "dense_f32_1", "share": len(fts)}))

    rows = []
    for label, kind, folder, opts in variants:
        out = root / "applied" / folder.name
        apply_delta(str(folder), str(base), out, task=opts.get("task"))
        size = folder_bytes(folder) / opts.get("share", 1)
        rows.append({"delta": label, "type": kind, "bytes_on_disk": int(size), "ratio": ft_bytes / size,
                     "rel_error": error(out, base, fts[0])})

    print(f"fine-tuned checkpoint: {ft_bytes} bytes (float32); noise share {args.noise}")
    print(f"{'delta':<36} {'type':<8} {'bytes on disk':>14} {'ratio':>8} {'rel. error':>11}")
    for r in rows:
        print(f"{r['delta']:<36} {r['type']:<8} {r['bytes_on_disk']:>14} {r['ratio']:>7.1f}x {r['rel_error']:>11.4g}")
    if args.json:
        args.json.write_text(json.dumps({"finetuned_bytes": ft_bytes, "noise": args.noise, "rows": rows}, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
