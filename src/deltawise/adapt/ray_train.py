"""One job on several processes: a Ray Train ``TorchTrainer`` whose workers all run the job's function.

    fit(TorchTrainer(loop, ScalingConfig(num_workers=N, use_gpu=G > 0, resources_per_worker={CPU: C, GPU: G})))
    loop: torch.distributed already initialised by Ray Train (gloo on the CPU, nccl on GPUs),
          RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set  ->  result = fn(job) on every worker

The function is the one a single-process job runs (BaM's ``train_branch_job``): under an initialised process group
transformers' Trainer (through accelerate) takes the existing group instead of starting one, and wraps the model in
DDP, so the job trains as under ``torchrun --nproc_per_node N`` (a global batch of N x --batch-size) and rank 0
writes its output. The value rank 0 returns is the job's result.

Ray Train is not asked to retry (``max_failures=0``): a failed job fails its executor run, and rerunning the command
continues from what is on storage, as for any job. Ray Train keeps a small record of each run under ``storage``
(the marker it writes to check that every node sees the path), which must therefore be on storage that every node
shares; an earlier attempt's record of the same name is removed first. Ray Train is part of the optional
``deltawise[ray]`` extra (``ray[train]``), imported only here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from deltawise.errors import DeltawiseError, InputError


@dataclass(frozen=True)
class Workers:
    """How many processes one job spans, and what each of them asks Ray for."""

    count: int = 2
    cpus: float = 1.0  # per worker
    gpus: float = 0.0  # per worker: 1 -> one GPU per process, nccl
    backend: Optional[str] = None  # torch.distributed backend; None: Ray Train's choice (nccl with GPUs, else gloo)


class WorkersFailed(DeltawiseError):
    """A job's workers failed; the message names each failed rank and its error."""


def import_ray_train(alternative: str = ""):
    """``ray.train`` and ``ray.train.torch``, or a clear error naming the extra (and ``alternative``)."""
    try:
        import ray.train
        import ray.train.torch  # noqa: F401
    except ImportError as exc:
        raise InputError(f"several workers per job need Ray Train ({exc}): pip install 'deltawise[ray]'"
                         + (f"; {alternative}" if alternative else "")) from None
    return ray.train


def _loop(config: dict[str, Any]) -> Any:
    """Every worker's train loop: the job's function; its result returned (Ray Train v2 keeps rank 0's) and reported
    (v1 keeps rank 0's last report)."""
    import ray.train

    result = config["fn"](config["job"])
    ray.train.report({"result": result})
    return result


def run_on_workers(fn: Callable[[Any], Any], job: Any, workers: Workers, storage: Path, name: str) -> Any:
    """``fn(job)`` on ``workers.count`` Ray Train workers of one process group; rank 0's return value.

    Call it where Ray is initialised (a Ray task, or a driver after ``ray.init``). ``storage``/``name``: where Ray
    Train keeps this run's record (shared by every node)."""
    train = import_ray_train()
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": workers.cpus} | ({"GPU": workers.gpus} if workers.gpus > 0 else {})
    shutil.rmtree(storage / name, ignore_errors=True)  # an earlier, failed attempt's record
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _loop, train_loop_config={"fn": fn, "job": job},
        scaling_config=train.ScalingConfig(num_workers=workers.count, use_gpu=workers.gpus > 0,
                                           resources_per_worker=resources),
        torch_config=TorchConfig(backend=workers.backend),
        run_config=train.RunConfig(name=name, storage_path=str(storage), failure_config=train.FailureConfig(max_failures=0)),
    )
    try:
        result = trainer.fit()
    except train.TrainingFailedError as exc:
        raise WorkersFailed(_describe(exc)) from None
    if getattr(result, "error", None) is not None:  # Ray Train v1 returns the error instead of raising it
        raise WorkersFailed(_describe(result.error))
    value = getattr(result, "return_value", None)  # v2: rank 0's return value
    if value is None and result.metrics:  # v1 keeps rank 0's last report
        value = result.metrics.get("result")
    return value


def _describe(exc: BaseException) -> str:
    """One line per failed worker (rank and the last line of its error), else the error's first line."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        return "; ".join(f"worker rank {rank}: {_last_line(err)}" for rank, err in sorted(failures.items()))
    return _last_line(exc)


def _last_line(exc: BaseException) -> str:
    """The line of an error message that names it (a traceback's last non-empty line, else the message)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
