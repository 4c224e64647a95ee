"""Runs the long language-transfer benchmark's runs in parallel processes that share one work folder.

    .venv/bin/python benchmarks/lt_workers.py --workers 8 --stop-after 480 -- --steps 400 --device cuda --checkpoints 0

One 135M-parameter run leaves most of a GPU idle: on an H200 eight runs at once each took 3.5 min, about 30 s of
the GPU per run (benchmarks/RESULTS.md, "Every method at its usual rate, seed 0, on a GPU"). Each job is one
``language_transfer_long.py`` process with its own ``--methods`` and ``--seeds``, so no two processes work on the same
run; the options after ``--`` go to every one of them. Jobs, in this order:

1. each seed of every method at its usual rate, seed by seed (a stopped session leaves whole seeds);
2. each method's other rates at the sweep seeds (``--seeds ""``: the main runs are not touched);
3. the forgetting-budget rows (full-guard, full-repair, full-lr-sweep), seed by seed.

The first job evaluates the base; the others start once its evaluation is in the work folder. A recorded run costs
a job only its start (the benchmark reads its record). ``--stop-after`` kills the running jobs that many seconds after
the start (a GPU lease's end): their finished stages are recorded, the rest of a killed run trains again next time.
Each job's output goes to WORK/logs/<job>.log; the summary lists each job's exit status and seconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

import lt_methods  # noqa: E402
from bench_args import seed_list_or_none  # noqa: E402

BUDGET_ROWS = [m.label for m in lt_methods.METHODS if m.tool]
MAIN_ROWS = [m.label for m in lt_methods.METHODS if not m.tool]


@dataclass(frozen=True)
class Job:
    method: str
    seeds: str  # --seeds
    sweep_seeds: str  # --sweep-seeds

    @property
    def name(self) -> str:
        return f"{self.method}_s{self.seeds or '-'}_sweep{self.sweep_seeds or '-'}"

    def options(self) -> list[str]:
        return ["--methods", self.method, "--seeds", self.seeds, "--sweep-seeds", self.sweep_seeds]


def jobs(methods: list[str], seeds: list[int], sweep_seeds: list[int]) -> list[Job]:
    """The jobs in the order they start (the module's docstring); a method with no other rate has no sweep job."""
    by_label = {m.label: m for m in lt_methods.METHODS}
    main = [m for m in methods if m in MAIN_ROWS]
    budget = [m for m in methods if m in BUDGET_ROWS]
    sweep = ",".join(map(str, sweep_seeds))
    out = [Job(m, str(s), "") for s in seeds for m in main]
    out += [Job(m, "", sweep) for m in main if sweep and len(by_label[m].lrs) > 1]
    out += [Job(m, str(s), "") for s in seeds for m in budget]
    return out


@dataclass
class Outcome:
    job: Job
    returncode: Optional[int]  # None: not started before the stop
    seconds: float = 0.0


class Pool:
    """``workers`` threads, each running the next job's process until none is left or the stop time has come."""

    def __init__(self, queue: list[Job], command: list[str], work: Path, workers: int, stop_after: Optional[float]):
        self.queue, self.command, self.work, self.workers = list(queue), command, work, workers
        self.start = time.monotonic()
        self.stop_at = None if stop_after is None else self.start + stop_after
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def stopped(self) -> bool:
        return self.stop_at is not None and time.monotonic() >= self.stop_at

    def next_job(self) -> Optional[Job]:
        with self.lock:
            return None if self.stopped() or not self.queue else self.queue.pop(0)

    def run_job(self, job: Job) -> None:
        t0 = time.monotonic()
        with open(self.work / "logs" / f"{job.name}.log", "w") as log:
            # a session of its own: a stop kills the job's children (the trainer's workers) with it
            process = subprocess.Popen([*self.command, *job.options()], stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            while process.poll() is None:
                if self.stopped():
                    os.killpg(process.pid, signal.SIGKILL)
                time.sleep(0.5)
        outcome = Outcome(job, process.returncode, time.monotonic() - t0)
        with self.lock:
            self.outcomes.append(outcome)
            print(f"{job.name}: exit {outcome.returncode}, {outcome.seconds:.0f} s", flush=True)

    def worker(self, first: bool) -> None:
        if not first:  # the first job evaluates the base, which every other job reuses
            while not (self.work / "base.json").is_file() and not self.stopped() and self.first_running():
                time.sleep(1)
        while (job := self.next_job()) is not None:
            self.run_job(job)

    def first_running(self) -> bool:
        return not self.outcomes  # once the first job has ended, waiting longer helps nothing

    def run(self) -> list[Outcome]:
        threads = [threading.Thread(target=self.worker, args=(i == 0,)) for i in range(self.workers)]
        threads[0].start()
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join()
        return self.outcomes + [Outcome(job, None) for job in self.queue]


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s [options] -- [language_transfer_long.py options]")
    ap.add_argument("--workers", type=int, default=8, help="processes at once (default 8: one GPU)")
    ap.add_argument("--stop-after", type=float, default=None, help="kill the running jobs after this many seconds")
    ap.add_argument("--work", type=Path, default=Path("bench-work/language_transfer_long"))
    ap.add_argument("--methods", default=",".join(lt_methods.LABELS), help="comma-separated method labels")
    ap.add_argument("--seeds", type=seed_list_or_none, default="0,1,2", help="seeds at each method's usual rate")
    ap.add_argument("--sweep-seeds", type=seed_list_or_none, default="0", help="seeds at the sweep's other rates")
    args = ap.parse_args(ours)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.stop_after is not None and not args.stop_after > 0:
        ap.error(f"--stop-after {args.stop_after}: give a positive number of seconds")
    for option in ("--work", "--methods", "--seeds", "--sweep-seeds", "--plan", "--pilot"):
        if option in theirs:
            ap.error(f"{option} is this script's to set (give it before --)")
    queue = jobs([m.label for m in lt_methods.select(args.methods)], args.seeds, args.sweep_seeds)
    command = [sys.executable, str(HERE / "language_transfer_long.py"), "--work", str(args.work), *theirs]
    outcomes = Pool(queue, command, args.work, args.workers, args.stop_after).run()
    failed = [o for o in outcomes if o.returncode not in (0, None)]
    left = [o.job.name for o in outcomes if o.returncode is None]
    print(f"{len(outcomes) - len(failed) - len(left)} jobs finished, {len(failed)} failed or stopped"
          f"{', not started: ' + ', '.join(left) if left else ''} (logs: {args.work / 'logs'})")
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
