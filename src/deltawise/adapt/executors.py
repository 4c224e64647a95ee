"""Where independent jobs run: in this process, in local worker processes, or as Ray tasks.

A job is a picklable argument to a module-level function: a BaM branch, an lr-sweep run, a
retention-budget candidate (a merge and its evaluation), a task-merging benchmark cell. ``Executor.run`` starts every
job, waits for all of them, and returns their results in order; when some fail, the others still
finish (their work is kept on storage) and one ``JobsFailed`` names the failures, so a rerun of the
same command continues from what is done. Ray schedules each job with the resources it asks for
(``Resources``) on a local instance or on the cluster at ``RAY_ADDRESS``; Ray is the optional
``deltawise[ray]`` extra, imported only when chosen. ``executor_for`` turns the command line's
``ExecutorOptions`` (declared once, in options.py) into an executor and each job's torch thread count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Optional

from deltawise.errors import DeltawiseError, InputError
from deltawise.options import ExecutorOptions

EXECUTORS = ("inline", "local", "ray")
Done = Callable[[int, Any], None]  # (job index, result), as each job finishes


class JobsFailed(DeltawiseError):
    """Some jobs failed (raised once all jobs have ended); ``failures`` maps job index -> message."""

    def __init__(self, failures: dict[int, str], total: int, labels: Optional[Sequence[str]] = None, hint: str = ""):
        self.failures, self.total = failures, total
        name = (lambda i: labels[i]) if labels is not None else (lambda i: f"job {i + 1}")
        lines = "; ".join(f"{name(i)}: {msg}" for i, msg in sorted(failures.items()))
        super().__init__(f"{len(failures)} of {total} job(s) failed: {lines}" + (f"; {hint}" if hint else ""))


@dataclass(frozen=True)
class Resources:
    """What one job asks the scheduler for (Ray's num_cpus / num_gpus; a fraction shares a device)."""

    cpus: float = 1.0
    gpus: float = 0.0


class Executor:
    name = ""

    def run(self, fn: Callable[[Any], Any], jobs: Sequence[Any], on_done: Optional[Done] = None) -> list[Any]:
        raise NotImplementedError


def gather(finished: Iterable[tuple[int, Callable[[], Any]]], total: int, on_done: Optional[Done],
           describe: Callable[[Exception], Optional[str]]) -> list[Any]:
    """The results of ``total`` jobs in job order. ``finished`` yields (job index, result getter) as jobs end; a
    getter's exception that ``describe`` turns into a message is a job failure: the other jobs are still collected
    and one ``JobsFailed`` names every failure at the end (``describe`` -> None: the exception propagates)."""
    results: list[Any] = [None] * total
    failures: dict[int, str] = {}
    for i, result in finished:
        try:
            results[i] = result()
        except Exception as exc:  # noqa: BLE001 - every failure is reported together below
            message = describe(exc)
            if message is None:
                raise
            failures[i] = message
            continue
        if on_done is not None:
            on_done(i, results[i])
    if failures:
        raise JobsFailed(failures, total)
    return results


class InlineExecutor(Executor):
    """One job after another in this process; the first error propagates as it was raised."""

    name = "inline"

    def run(self, fn, jobs, on_done=None):
        results = []
        for i, job in enumerate(jobs):
            results.append(fn(job))
            if on_done is not None:
                on_done(i, results[-1])
        return results


class LocalExecutor(Executor):
    """``processes`` worker processes on this machine (spawned, not forked: the parent may hold torch
    threads and locks a forked child would inherit mid-use)."""

    name = "local"

    def __init__(self, processes: int):
        if processes < 1:
            raise InputError(f"the local executor needs at least 1 process, got {processes}")
        self.processes = processes

    def run(self, fn, jobs, on_done=None):
        if not jobs:
            return []
        with ProcessPoolExecutor(max_workers=min(self.processes, len(jobs)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            return gather(((futures[f], f.result) for f in as_completed(futures)), len(jobs), on_done,
                          lambda exc: f"{type(exc).__name__}: {exc}")


class RayExecutor(Executor):
    """Each job a Ray task with ``resources``; tasks are not retried (a rerun continues instead, and a
    retried job would redo work another attempt may have half written). Joins the running Ray instance
    (``ray.init`` called earlier, or ``RAY_ADDRESS``), else starts a local one for the duration of ``run``."""

    name = "ray"

    def __init__(self, resources: Resources, address: Optional[str] = None):
        self.resources = resources
        self.address = address

    def run(self, fn, jobs, on_done=None):
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
        try:
            return self._run(ray, fn, jobs, on_done)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray, fn, jobs, on_done):
        task = ray.remote(num_cpus=self.resources.cpus, num_gpus=self.resources.gpus, max_retries=0)(fn)
        refs = {task.remote(job): i for i, job in enumerate(jobs)}

        def finished():
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield refs[ready[0]], lambda ref=ready[0]: ray.get(ref)

        def describe(exc: Exception) -> Optional[str]:
            if isinstance(exc, ray.exceptions.RayTaskError):  # the job raised: report its own error
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                return f"{type(cause).__name__}: {cause}"
            if isinstance(exc, ray.exceptions.RayError):  # the worker died (killed, out of memory) or the node was lost
                return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return None

        return gather(finished(), len(jobs), on_done, describe)


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'deltawise[ray]' (or use --executor local)") from None
    return ray


def make_executor(name: str, *, processes: int = 1, resources: Resources = Resources(),
                  address: Optional[str] = None) -> Executor:
    """The executor called ``name`` (one of ``EXECUTORS``)."""
    if name == "inline":
        return InlineExecutor()
    if name == "local":
        return LocalExecutor(processes)
    if name == "ray":
        import_ray()  # refuse before any work starts
        return RayExecutor(resources, address)
    raise InputError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


def executor_for(options: ExecutorOptions, count: int) -> tuple[Executor, Optional[int]]:
    """The executor ``options`` name for ``count`` jobs, and the torch threads each job should set: a local
    process gets its share of this machine's cores, a Ray task the CPUs it asked for (at least 1), an
    inline job leaves this process as it is (None).

    A job of several workers (``job_workers`` > 1, Ray only) is a Ray task that asks for nothing and launches
    the job's workers (adapt/ray_train.py), each asking for ``job_cpus``/``job_gpus`` and setting the threads."""
    name = options.name
    if options.job_workers > 1 and name != "ray":
        raise InputError(f"{options.job_workers} workers per job run through Ray Train: use the ray executor")
    processes = options.jobs or max(count, 1)
    threads = {"local": max(1, (os.cpu_count() or 1) // max(1, min(processes, count))),
               "ray": max(1, int(options.job_cpus))}.get(name)
    task = Resources(0, 0) if options.job_workers > 1 else Resources(options.job_cpus, options.job_gpus)
    return make_executor(name, processes=processes, resources=task), threads
