"""What the retention guard (``train --retain``) costs: the share of a run's time spent on its checks.

What it measures
    One guarded training run with ``--monitor-every 0`` (the automatic interval, which aims at 10% of the
    training time) and prints, from the run's ``deltawise_guard.json``: the optimizer steps' seconds, the
    checks' seconds (the baseline and the held-out report at the ends are not counted: they are paid once),
    their share, the intervals the guard chose, and the kept step. The first and the last step are always
    checked, so a short run pays one or two checks more than the share.

How to run it (from the repository root)
    # a tiny random Llama (seconds)
    .venv/bin/python benchmarks/guard_overhead.py --tiny
    # SmolLM2-shaped: a SmolLM2-135M folder (e.g. the GGUF converted by `deltawise train x.gguf`), English
    # source and German training data as %-separated text
    .venv/bin/python benchmarks/guard_overhead.py --model SMOLLM2_FOLDER --source en.txt --data de.txt --method lora
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

EN = "the cat sat on a mat and the dog ran to the park while birds sang in green trees".split()
DE = "der hund lief schnell zum grossen park und die katze schlief auf einer warmen decke".split()


def _first_items(path: Path, n: int, out: Path) -> Path:
    from deltawise.data.read import load_items
    from deltawise.search.splits import write_items

    return write_items(out, load_items(path, require=())[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and synthetic data")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--source", type=Path, help="source (retention) data")
    ap.add_argument("--data", type=Path, help="training data")
    ap.add_argument("--items", type=int, default=40, help="items used of each file")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--minimum", type=float, default=0.95)
    args = ap.parse_args()

    from deltawise.adapt import TrainConfig
    from deltawise.adapt.guarded import GuardRequest, guarded_train
    from deltawise.search.budget import RetentionBudget

    work = Path(tempfile.mkdtemp(prefix="guard-overhead-"))
    try:
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import save_tiny_llama

            rng = random.Random(0)
            en = [" ".join(rng.choice(EN) for _ in range(20)) for _ in range(args.items)]
            de = [" ".join(rng.choice(DE) for _ in range(20)) for _ in range(args.items)]
            (work / "en.txt").write_text("\n%\n".join(en) + "\n")
            (work / "de.txt").write_text("\n%\n".join(de) + "\n")
            model = save_tiny_llama(work / "model", en + de, hidden=64, layers=2, vocab=128)
            source, data = work / "en.txt", work / "de.txt"
        else:
            if not (args.model and args.source and args.data):
                ap.error("give --tiny, or --model, --source and --data")
            model = args.model
            source = _first_items(args.source, args.items, work / "source" / f"{args.source.stem}.jsonl")
            data = _first_items(args.data, args.items, work / "data" / f"{args.data.stem}.jsonl")
        cfg = TrainConfig(model=model, data=data, output=work / "out", method=args.method, max_steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, max_length=args.max_length, progress=False)
        start = time.perf_counter()
        result = guarded_train(cfg, GuardRequest(retain=[RetentionBudget(source, args.minimum)]), note=print)
        wall = time.perf_counter() - start
        monitor = result.record["monitor"]
        summary = {"model": str(model), "method": args.method, "steps": result.train.steps, "wall_seconds": wall,
                   "train_seconds": monitor["train_seconds"], "monitor_seconds": monitor["monitor_seconds"],
                   "overhead": monitor["overhead"], "checks": monitor["checks"], "intervals": monitor["intervals_used"],
                   "monitor_items": [s["monitor_items"] for s in result.record["splits"]],
                   "kept_step": result.record["chosen"]["step"]}
        print(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
