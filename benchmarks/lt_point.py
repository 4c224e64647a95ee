"""One model outside the long language-transfer benchmark's runs, scored as it scores them and set against full
fine-tuning's front of one seed: e.g. a point of a guard's interpolation line searched again by ``deltawise budget``.

    .venv/bin/python benchmarks/language_transfer_long.py --recorded-only --device cpu --steps 400 \\
        --sweep-seeds 0,1,2 --work W                      # W: the drawn sets, then every recorded run's eval.json
    .venv/bin/python benchmarks/lt_point.py MODEL --seed 0 --work W --out point.json

The model is evaluated on W's evaluation sets with the benchmark's settings (lt_methods.eval_options: windows of 256
tokens, byte-normalised WordNet choices) and compared with W's base evaluation; ``--out`` is kept, so a rerun only
compares. The comparison is lt_report.matched_pairs with the model as a forgetting-budget row: at its own gain,
paired over items, against full's front of that seed (its rates up to the peak gain).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]  # as language_transfer_long.py: lt_methods reads realtext

import lt_report  # noqa: E402
from language_transfer_long import item_samples  # noqa: E402
from lt_methods import Data, eval_options  # noqa: E402

POINT = "point"  # the scored model's key and label among the benchmark's rows


def main(argv: list[str] | None = None) -> None:
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.intervals import paired_sample
    from deltawise.eval.results import load_result
    from deltawise.eval.runner import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="model folder to score")
    ap.add_argument("--seed", type=int, required=True, help="the seed whose full fine-tuning front it is set against")
    ap.add_argument("--work", type=Path, required=True, help="work folder of a --recorded-only (or full) benchmark run")
    ap.add_argument("--out", type=Path, required=True, help="the model's evaluation (JSON; reused when present)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    data = Data(args.work / "data")
    base = load_result(args.work / "base.json")
    if not args.out.is_file():
        options = eval_options(SimpleNamespace(eval_batch_size=args.eval_batch_size, device=args.device))
        result = evaluate(str(args.model), [data.prose_eval, data.mc], [data.german_eval], options)
        result.model = args.model.name
        result.forgetting = forgetting(result, base)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result.save(args.out)
    mine = load_result(args.out)

    # the model as one more forgetting-budget row (compared at its own gain), beside the recorded runs of full
    payload = json.loads((args.work / "language_transfer_long.json").read_text())
    rows = [r for r in payload["runs"] if r["label"] == "full" and r["seed"] == args.seed]
    samples = item_samples(rows, data, SimpleNamespace(work=args.work))
    sets, by_name = {d.name: d for d in mine.datasets}, {d.name: d for d in base.datasets}
    samples[POINT] = tuple(paired_sample(sets[f.stem], by_name[f.stem]) for f in (data.german_eval, data.prose_eval))
    point = {"key": POINT, "label": POINT, "seed": args.seed, "lr": None, "tool": "lt_point"}
    found = lt_report.matched_pairs([*rows, point], samples, methods=[POINT])
    if not found:
        raise SystemExit(f"full fine-tuning has fewer than two recorded rates at seed {args.seed} in {args.work}: no front")
    f = mine.forgetting
    front = sorted(rows, key=lambda r: r["lr"])
    print("full's runs: " + ", ".join(f"{r['lr']:g} (+{r['target_gain']:.3f}, {r['prose_retention']:.3f})" for r in front))
    print(f"gain {f.target_gain:+.3f} [{f.target_gain_ci[0]:.3f}, {f.target_gain_ci[1]:.3f}]")
    for d in f.datasets:
        if d.role == "source":
            print(f"{d.name} ratio {d.ratio:.3f} [{d.ratio_ci[0]:.3f}, {d.ratio_ci[1]:.3f}]")
    compared = found[0]
    if compared["difference"] is None:
        print("no gain in common with full's front")
    else:
        lo, hi = compared["difference_ci"]
        print(f"full's front at this gain {compared['b']:.3f}; retention − full {compared['difference']:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}] ({compared['dropped']}/{compared['replicates']} replicates dropped)")


if __name__ == "__main__":
    main()
