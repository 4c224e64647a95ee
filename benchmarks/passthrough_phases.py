"""CPU and wall seconds per phase of one ``deltawise merge`` in this process (threads' times summed per phase).

    python benchmarks/passthrough_phases.py RECIPE.yaml OUT [--old-finite] [--shard-size 2GB]

Phases: reading rows (preadv), the NaN/inf screen of the inputs, pwrite, the shards' sha256 (and the
bytes it reads back from the page cache for chunks written out of order), planning, finishing the
folder; then the merge's CPU (user, sys), wall seconds, page faults and the load average.
``--old-finite`` puts back the former screen (a float32 sum of every chunk) for a before/after run;
``--shard-size`` as the merge's (merge_speed.py passes 2GB). Build the inputs with
``synthetic.ensure_checkpoints`` and ``build_recipe``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import threading
import time
from collections import defaultdict

import torch
import yaml

import deltawise.io.reader as reader_mod
import deltawise.io.writer as writer_mod
import deltawise.merge.engine as engine_mod
import deltawise.merge.loader as loader_mod
from deltawise.errors import InputError
from deltawise.io.writer import parse_size
from deltawise.merge import build_plan, merge, parse_recipe

spent: dict[str, float] = defaultdict(float)
waited: dict[str, float] = defaultdict(float)  # wall seconds in the phase, summed over threads
read_back = [0, 0.0]
lock = threading.Lock()


def timed(label, fn):
    def wrap(*args, **kwargs):
        start, wall = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                spent[label] += time.thread_time() - start
                waited[label] += time.perf_counter() - wall
    return wrap


class _CountingOs:
    """``os`` for the writer: counts what it reads back to hash."""

    def __getattr__(self, name):
        return getattr(os, name)

    def preadv(self, fd, buffers, offset):
        start = time.thread_time()
        n = os.preadv(fd, buffers, offset)
        with lock:
            read_back[0] += n
            read_back[1] += time.thread_time() - start
        return n


def old_require_finite(x: torch.Tensor, label: str, name: str) -> None:
    if x.is_floating_point() and not (bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())):
        raise InputError(f"model {label!r}: tensor {name!r} contains NaN or infinite values")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--old-finite", action="store_true")
    parser.add_argument("--shard-size", default="5GB", help="the merge's --shard-size (merge_speed.py passes 2GB)")
    args = parser.parse_args()
    reader_mod.ModelReader.read_rows_into = timed("read (preadv)", reader_mod.ModelReader.read_rows_into)
    check = old_require_finite if args.old_finite else loader_mod.require_finite
    loader_mod.require_finite = timed("NaN/inf screen", check)
    writer_mod.StreamingShardWriter._pwrite_all = staticmethod(timed("pwrite", writer_mod.StreamingShardWriter._pwrite_all))
    writer_mod.StreamingShardWriter._advance = timed("sha256 (read-back included)", writer_mod.StreamingShardWriter._advance)
    writer_mod.os = _CountingOs()
    engine_mod._finish_folder = timed("finish folder (config, card, manifest)", engine_mod._finish_folder)
    shutil.rmtree(args.out, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    before, faults, wall = usage.ru_utime + usage.ru_stime, usage.ru_minflt + usage.ru_majflt, time.perf_counter()
    start = time.thread_time()
    with open(args.recipe) as f:
        build_plan(parse_recipe(yaml.safe_load(f)))
    spent["plan (once more, alone)"] += time.thread_time() - start
    merge(args.recipe, args.out, shard_size=parse_size(args.shard_size))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"merge: {usage.ru_utime + usage.ru_stime - before:.2f} CPU s (user {usage.ru_utime:.2f}, sys {usage.ru_stime:.2f} "
          f"since start), {time.perf_counter() - wall:.2f} s wall, "
          f"{usage.ru_minflt + usage.ru_majflt - faults} page faults, load {os.getloadavg()[0]:.1f} "
          f"({'old' if args.old_finite else 'new'} NaN/inf screen)")
    print(f"  {'phase':42s} {'CPU s':>6s} {'wall s':>6s} (wall summed over threads)")
    for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:42s} {seconds:6.2f} {waited[label]:6.2f}")
    print(f"  read back to hash: {read_back[0] / 1e6:.0f} MB in {read_back[1]:.2f} s")


if __name__ == "__main__":
    main()
