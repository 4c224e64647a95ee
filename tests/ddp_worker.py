"""Run by ``torchrun`` in tests/test_train_ddp.py (and by hand): train several methods in one
multi-process launch and save every rank's final weights.

    torchrun --nproc_per_node 2 tests/ddp_worker.py SPEC.json

SPEC.json: {"model": ..., "data": ..., "out": ..., "runs": [{"name": ..., "method": ..., "task": ...,
"method_params": {...}, "train": {...TrainConfig fields...}}]}. Each run writes ``out/NAME`` (rank 0) and
``out/NAME.rank{R}.safetensors`` (every rank's parameters when training ended).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainerCallback


class SaveWeights(TrainerCallback):
    """Saves the model's parameters at the end of training, one file per process."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}, str(self.path))


def config(spec: dict, run: dict, out: Path):
    from deltawise.adapt import TrainConfig

    return TrainConfig(model=Path(spec["model"]), data=Path(run.get("data", spec["data"])), output=out, method=run["method"],
                       task=run.get("task", "causal_lm"), progress=False, method_params=run.get("method_params", {}),
                       **run.get("train", {}))


def main(spec_path: str) -> None:
    import os

    from deltawise.adapt import run_train

    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["out"])
    for run in spec["runs"]:
        rank = int(os.environ.get("RANK", "0"))  # the process group starts inside run_train
        result = run_train(config(spec, run, root / run["name"]),
                           callbacks=[SaveWeights(root / f"{run['name']}.rank{rank}.safetensors")])
        if result.is_main_process:
            print(f"ok {run['name']} steps={result.steps}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
