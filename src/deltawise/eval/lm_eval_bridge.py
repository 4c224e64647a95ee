"""Run lm-evaluation-harness tasks on a local model when ``lm_eval`` is installed (optional).

lm-eval is not a dependency of deltawise: this bridge imports it on demand. Only tasks whose
data is already on disk (the datasets cache) can run, since no machine here reaches the hub;
``HF_DATASETS_OFFLINE=1`` is set so a missing dataset fails fast instead of hanging.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from deltawise.errors import DeltawiseError, InputError
from deltawise.eval.results import DatasetResult, Role

NOT_INSTALLED = (
    "lm-eval tasks need the optional package lm-eval (pip install lm-eval); it is not installed. "
    "Evaluate local files with --source/--target instead."
)
PREFERRED_METRICS = ("acc_norm,none", "acc,none", "exact_match,none", "word_perplexity,none")


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_lm_eval(model_path: Path, tasks: list[tuple[Role, str]], *, batch_size: int, device: str) -> list[DatasetResult]:
    if not lm_eval_available():
        raise DeltawiseError(NOT_INSTALLED)
    import lm_eval

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [name for _, name in tasks]
    start = time.perf_counter()
    try:
        out = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_path}", tasks=names, batch_size=batch_size, device=device,
        )
    except Exception as exc:  # lm-eval raises many kinds for missing offline data
        raise InputError(f"lm-eval could not run {names} offline ({type(exc).__name__}: {exc}); only tasks with local data work") from None
    seconds = time.perf_counter() - start
    results = []
    for role, name in tasks:
        metrics = out["results"].get(name, {})
        key = next((k for k in PREFERRED_METRICS if k in metrics), None)
        if key is None:
            raise InputError(f"lm-eval task {name!r} reported none of the metrics {PREFERRED_METRICS}")
        results.append(DatasetResult(
            name=name, role=role, task="lm_eval", path=f"lm-eval:{name}", metric=key.split(",")[0],
            value=float(metrics[key]), higher_is_better="perplexity" not in key, seconds=seconds / len(tasks),
        ))
    return results
