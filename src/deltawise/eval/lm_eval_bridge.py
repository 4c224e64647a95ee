"""Run lm-evaluation-harness tasks on a local model when ``lm_eval`` is installed (optional).

lm-eval is not a runtime dependency of deltawise: this bridge imports it on demand. The model
is the one deltawise already loaded (same dtype and device as the other datasets), wrapped in
lm-eval's ``HFLM``; nothing is fetched from the hub. Only tasks whose data is on disk can run:
either tasks already in the datasets cache, or local task YAMLs in a folder given with
``--lm-eval-tasks-dir`` (``dataset_path: json`` + ``dataset_kwargs: {data_files: ...}``).
``HF_DATASETS_OFFLINE=1``/``HF_HUB_OFFLINE=1`` are set so a missing dataset fails fast.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deltawise.errors import DeltawiseError, InputError
from deltawise.eval.models import LoadedModel
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


def git_hash_without_stderr() -> str | None:
    """``git describe --always`` of the working folder, as lm-eval records it, with git's own stderr discarded."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)  # noqa: S607
    except OSError:  # git not installed
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


@contextmanager
def quiet_git_hash() -> Iterator[None]:
    """While lm-eval evaluates, record its git hash without git printing "fatal: not a git repository".

    ``simple_evaluate`` logs the hash of the current folder by running ``git describe`` with stderr inherited
    (``lm_eval.loggers.utils.get_git_commit_hash``), so outside a git checkout every ``deltawise eval --tasks``
    printed git's error. The name ``simple_evaluate`` looks up is replaced for the call only, and only if present.
    """
    import lm_eval.evaluator as evaluator

    if not hasattr(evaluator, "get_git_commit_hash"):
        yield
        return
    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_hash_without_stderr
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def run_lm_eval(
    lm: LoadedModel, tasks: list[tuple[Role, str]], *, batch_size: int, tasks_dir: Path | None = None,
) -> list[DatasetResult]:
    """Evaluate the loaded causal LM ``lm`` on lm-eval ``tasks``; ``tasks_dir`` adds local task YAMLs.

    Each task reports the first of ``PREFERRED_METRICS`` it computes (``acc_norm`` before ``acc``).
    """
    if not lm_eval_available():
        raise DeltawiseError(NOT_INSTALLED)
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise InputError(f"--lm-eval-tasks-dir {str(tasks_dir)!r} is not a folder")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = [name for _, name in tasks]
    manager = TaskManager(include_path=str(tasks_dir) if tasks_dir is not None else None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" or in {str(tasks_dir)!r}" if tasks_dir is not None else " (local task YAMLs: --lm-eval-tasks-dir)"
        raise InputError(f"lm-eval knows no task {unknown} among its built-in tasks{where}")
    model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, backend="causal", batch_size=batch_size)
    start = time.perf_counter()
    try:
        with quiet_git_hash():
            out = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, log_samples=True)
    except Exception as exc:  # lm-eval raises many kinds for missing offline data
        raise InputError(f"lm-eval could not run {names} offline ({type(exc).__name__}: {exc}); "
                         "only tasks with local data work") from None
    seconds = time.perf_counter() - start
    results = []
    for role, name in tasks:
        metrics = out["results"].get(name, {})
        key = next((k for k in PREFERRED_METRICS if k in metrics), None)
        if key is None:
            raise InputError(f"lm-eval task {name!r} reported none of the metrics {PREFERRED_METRICS}")
        short = key.split(",")[0]
        per_item = None
        samples = (out.get("samples") or {}).get(name)
        if samples and all(short in s for s in samples):
            per_item = {str(s["doc_id"]): float(s[short]) for s in samples}
        results.append(DatasetResult(
            name=name, role=role, task="lm_eval", path=f"lm-eval:{name}", metric=short,
            value=float(metrics[key]), higher_is_better="perplexity" not in key, seconds=seconds / len(tasks),
            n_items=int(out.get("n-samples", {}).get(name, {}).get("effective", len(samples or []))), per_item=per_item,
        ))
    return results
