"""Branch-and-Merge (BaM; Alexandrov et al. 2024, arXiv 2407.08699).

    D shuffled (seeded) and cut into N = K·R disjoint slices D_1..D_N
    θ^(0) = MODEL
    round j = 1..R:  θ_{j,k} = train(θ^(j−1), D_{(j−1)K+k})   for k = 1..K   (independent branches)
                     θ^(j)   = Merge(θ_{j,1}, …, θ_{j,K}; base = θ^(j−1))
    OUT = θ^(R)

Each branch is an ordinary ``train`` run (any method; adapters are folded into full weights
before merging), with its own LR schedule, so the LR re-warms and re-decays in every branch
(Ibrahim et al. 2024, arXiv 2403.08763), and optional replay data mixed into every batch. Merge defaults: SLERP t = 0.5
for K = 2, the uniform average (linear) for K > 2; any registered merge method may be named.

Work folder (resumable; a rerun of the same command skips what is finished)::

    WORK/bam_state.json              fingerprint of the options, the data and the model
    WORK/round_j/branch_k/data.jsonl the branch's slice
    WORK/round_j/branch_k/train/     the train output (adapter, delta or full model)
    WORK/round_j/branch_k/model/     the full model (adapters only; a full run uses train/)
    WORK/round_j/branch_k/done.json  written last: slice, loss, tokens, seconds
    WORK/round_j/merged/             θ^(j), written atomically by the merge engine
    WORK/round_j/merge.json          written last: method, parameters, seconds
    WORK/round_j/.ray_train/branch_k Ray Train's record of a branch trained on several workers

A branch without ``done.json`` is trained again from scratch; a round with ``merge.json`` is
not merged again. OUT (θ^(R) plus ``bam.json``) is written atomically at the end.

The branches of a round are independent jobs for an executor (``deltawise.adapt.executors``): one
after another in this process (``inline``, the default), in local processes, or as Ray tasks with
the CPUs/GPUs each asks for. Every job reads and writes only its branch folder, so the work folder
on shared storage is all the nodes of a cluster share (docs/adapt.md, "Running branches on a cluster").
A branch can itself span several processes: with ``--branch-workers N`` each Ray job is a Ray Train
``TorchTrainer`` of N workers (adapt/ray_train.py) running ``train_branch_job`` as one DDP run, and so does
``torchrun --nproc_per_node N ... bam --branch-index K``; rank 0 writes the branch, as one process would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from deltawise.adapt.data import Example, read_examples
from deltawise.adapt.dist import broadcast_object, is_distributed, rank, world_size
from deltawise.adapt.executors import EXECUTORS, JobsFailed, executor_for
from deltawise.adapt.materialize import materialize
from deltawise.adapt.ray_train import Workers
from deltawise.adapt.train import TrainConfig, run_train
from deltawise.errors import InputError, OutputError
from deltawise.io.output import check_output_folder, output_lock, staged_output, unwritable
from deltawise.io.writer import write_json_atomic
from deltawise.options import ExecutorOptions

STATE = "bam_state.json"
DONE = "done.json"
MERGE_DONE = "merge.json"
LOG = "bam.json"
RAY_TRAIN = ".ray_train"  # in a round folder: Ray Train's records of multi-worker branches
SCHEMA = "deltawise.bam/1"

Progress = Callable[[str, int, int], None]  # (stage, done, total): "rounds", "branches"
Note = Callable[[str], None]


@dataclass
class BamConfig:
    """``train`` holds the per-branch training settings; its ``model``, ``data`` and ``output``
    name the base model, the whole data file and the final output (each branch gets its own)."""

    train: TrainConfig
    branches: int = 2
    rounds: int = 1
    merge: Optional[str] = None  # None: slerp (t=0.5) for 2 branches, linear otherwise
    merge_params: dict[str, Any] = field(default_factory=dict)
    work: Optional[Path] = None  # default: OUT.work beside OUT
    restart: bool = False
    branch_index: Optional[int] = None  # train only this branch (1-based) of the first unmerged round
    merge_only: bool = False  # train nothing: merge the rounds whose branches are all finished
    merge_threads: int = 2
    executor: str = "inline"  # where a round's branches train: inline (this process, in turn), local (processes), ray
    jobs: int = 0  # local executor: branches trained at once (0: all of a round's)
    branch_cpus: float = 1.0  # ray executor: CPUs each branch task asks for
    branch_gpus: float = 0.0  # ray executor: GPUs each branch task asks for (each worker's, with branch_workers > 1)
    branch_workers: int = 1  # ray executor: processes (Ray Train workers) each branch trains on, as one DDP run

    @property
    def work_dir(self) -> Path:
        out = Path(self.train.output)
        return Path(self.work) if self.work is not None else out.parent / f"{out.name}.work"


@dataclass
class BranchJob:
    """One branch of a round, as an executor ships it to a worker (picklable)."""

    train: TrainConfig
    start: Path
    folder: Path
    round: int
    branch: int
    index: int
    examples: list[Example]
    indices: list[int]
    threads: Optional[int] = None  # torch threads in a worker process (None: leave as is)
    workers: Optional[Workers] = None  # several processes (Ray Train workers) train this branch together


def train_branch_job(job: BranchJob, tell: Optional[Note] = None) -> dict[str, Any]:
    """Train one branch under its own lock and return its ``done.json`` record (run in any process).

    In a multi-process run (Ray Train's workers, ``torchrun ... --branch-index``) every process calls this as one DDP
    run: rank 0 locks and prepares the branch folder and writes the branch, the others train beside it from a copy
    of the slice of their own, and every process returns rank 0's record."""
    tell = tell or (lambda _msg: None)
    if job.threads is not None:
        import torch

        torch.set_num_threads(job.threads)
    if world_size() == 1:
        with output_lock(job.folder, "BaM branch"):
            return _train_branch(job, _write_slice(job), True, tell)
    main = rank() == 0
    with ExitStack() as held:
        if main:
            held.enter_context(output_lock(job.folder, "BaM branch"))
            data = _write_slice(job)
        else:  # rank 0 may still be clearing the branch folder: read the slice from a private copy
            data = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="deltawise-bam-"))) / "data.jsonl"
            data.write_text(_slice_text(job), encoding="utf-8")
        if is_distributed():  # a group started before (Ray Train): the others go on once the folder is ready
            import torch

            torch.distributed.barrier()  # (under torchrun, the group starts in run_train, after rank 0's staging)
        record = _train_branch(job, data, main, tell if main else (lambda _msg: None))
    return broadcast_object(record)


def train_branch_on_workers(job: BranchJob) -> dict[str, Any]:
    """Train one branch on ``job.workers`` Ray Train workers (one DDP run of ``train_branch_job``) and return its
    ``done.json`` record: a Ray task of ``--executor ray --branch-workers N``."""
    from deltawise.adapt.ray_train import run_on_workers

    assert job.workers is not None
    return run_on_workers(train_branch_job, dataclasses.replace(job, workers=None), job.workers,
                          job.folder.parent / RAY_TRAIN, job.folder.name)


@dataclass
class BamResult:
    output: Optional[Path]  # None when only one branch was trained (--branch-index)
    log: dict[str, Any]


def merge_choice(branches: int, method: Optional[str], params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The merge method and its recipe-wide parameters (our defaults: docs/adapt.md, "Branch-and-Merge")."""
    from deltawise.merge import REGISTRY

    name = method or ("slerp" if branches == 2 else "linear")
    cls = REGISTRY.get(name)
    if cls is None:
        raise InputError(f"unknown merge method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    params = dict(params)
    if name == "slerp":
        params.setdefault("t", 0.5)
    if cls.max_models == 1 and branches != 2:
        raise InputError(f"{name} merges exactly two models; use --branches 2 or another --merge method")
    return name, params


def merge_recipe(method: str, params: dict[str, Any], start: Path, branches: list[Path], seed: int) -> dict[str, Any]:
    """A merge recipe for one round. Two-model methods (slerp) interpolate branch 1 -> branch 2;
    methods taking task vectors use the round's start model as base_model; the others (linear)
    average the branches alone."""
    from deltawise.merge import REGISTRY

    cls = REGISTRY[method]
    recipe: dict[str, Any] = {"merge_method": method, "parameters": params, "out_dtype": "float32", "seed": seed}
    if cls.max_models == 1:
        recipe.update(base_model=str(branches[0]), models=[{"model": str(b)} for b in branches[1:]])
    elif cls.base_policy == "required":
        recipe.update(base_model=str(start), models=[{"model": str(b)} for b in branches])
    else:
        recipe["models"] = [{"model": str(b)} for b in branches]
    return recipe


def split_slices(n: int, count: int, seed: int) -> list[list[int]]:
    """Shuffle 0..n-1 with ``seed`` and cut the order into ``count`` disjoint, near-equal slices."""
    if n < count:
        raise InputError(f"the data holds {n} examples, fewer than the {count} slices (branches x rounds) needed")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i * n // count : (i + 1) * n // count] for i in range(count)]


def _example_record(ex: Example, task: str) -> dict[str, Any]:
    if task == "classification":
        return {"text": ex.text, "label": ex.label}
    if ex.messages:
        return {"messages": [{"role": role, "content": content} for role, content in ex.messages]}
    if ex.prompt:
        return {"prompt": ex.prompt, "response": ex.text}
    return {"text": ex.text}


def _file_sha256(path: Optional[Path]) -> Optional[str]:
    """SHA-256 of a data file, or of a data folder's files (a `datasets` folder: names and contents, sorted)."""
    if path is None:
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:  # a single file hashes to its bytes alone, so existing work folders keep their fingerprint
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(cfg: BamConfig, model_path: Path) -> dict[str, Any]:
    """Everything a finished branch or round depends on: options, data and model contents."""
    from deltawise.adapt.methods import get_method
    from deltawise.io.reader import ModelReader

    # permissions to load (remote code, pickle) change no result: a run continues whichever is given
    skipped = ("model", "data", "output", "replay", "overwrite", "progress", "trust_remote_code", "allow_pickle")
    train = {k: v for k, v in asdict(cfg.train).items() if k not in skipped}
    # resolved (validated, defaults filled), so giving a parameter its default value is the same run
    train["method_params"] = get_method(cfg.train.method, cfg.train.method_params).values
    return {
        "model": ModelReader(model_path, allow_pickle=cfg.train.allow_pickle).fingerprint(),
        "data": _file_sha256(Path(cfg.train.data)),
        "replay": _file_sha256(Path(cfg.train.replay) if cfg.train.replay else None),
        "branches": cfg.branches, "rounds": cfg.rounds,
        "merge": list(merge_choice(cfg.branches, cfg.merge, cfg.merge_params)),
        "train": json.loads(json.dumps(train, default=str)),
        # N workers train with N x --batch-size a step; one process keeps the fingerprint work folders already hold
        **({"branch_workers": cfg.branch_workers} if cfg.branch_workers != 1 else {}),
    }


def _open_work(work: Path, key: dict[str, Any], restart: bool) -> None:
    state = work / STATE
    # hidden names: another process's atomic write of the state file, when branches start together
    if work.exists() and any(not p.name.startswith(".") for p in work.iterdir()):
        if not state.is_file():
            raise OutputError(f"work folder {work} is not empty and holds no BaM run ({STATE}); choose another --work")
        old = json.loads(state.read_text()).get("fingerprint", {})
        if old != key:
            if not restart:
                changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
                if "train" in changed:
                    changed.remove("train")
                    changed += sorted(k for k in set(old.get("train", {})) | set(key["train"])
                                      if old.get("train", {}).get(k) != key["train"].get(k))
                raise OutputError(f"work folder {work} holds a BaM run with different options or inputs "
                                  f"(changed: {', '.join(changed)}); pass --restart to discard it, or choose another --work")
        if restart or old != key:
            shutil.rmtree(work)
    elif restart and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not state.is_file():
        write_json_atomic(state, {"schema": SCHEMA, "fingerprint": key})


def _last_loss(log: list[dict[str, Any]]) -> Optional[float]:
    losses = [r["loss"] for r in log if "loss" in r]
    return losses[-1] if losses else None


def run_bam(cfg: BamConfig, *, model_path: Optional[Path] = None, progress: Optional[Progress] = None,
            note: Optional[Note] = None) -> BamResult:
    """Run (or continue) BaM; write the final model to ``cfg.train.output`` unless only one branch
    was asked for. ``model_path`` overrides the folder loaded for ``cfg.train.model`` (GGUF input).

    The work folder is locked for the run (``output_lock``): exclusively by a whole run or a
    ``--merge-only`` one, shared by ``--branch-index`` runs, which lock their own branch besides."""
    work = cfg.work_dir
    try:
        work.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(work, exc) from None
    with output_lock(work, "BaM work folder", shared=cfg.branch_index is not None):
        return _run_bam(cfg, model_path=model_path, progress=progress, note=note)


def _run_bam(cfg: BamConfig, *, model_path: Optional[Path] = None, progress: Optional[Progress] = None,
             note: Optional[Note] = None) -> BamResult:
    from deltawise.merge import merge

    started = time.time()
    tell = note or (lambda _msg: None)
    tick = progress or (lambda _stage, _done, _total: None)
    tc = cfg.train
    K, R = cfg.branches, cfg.rounds
    if K < 1 or R < 1:
        raise InputError(f"--branches and --rounds must be at least 1 (got {K} and {R})")
    if cfg.branch_index is not None and cfg.merge_only:
        raise InputError("--branch-index trains one branch and --merge-only trains none; give one of them")
    if cfg.branch_index is not None and not 1 <= cfg.branch_index <= K:
        raise InputError(f"--branch-index must be between 1 and --branches ({K}), got {cfg.branch_index}")
    if cfg.executor not in EXECUTORS:
        raise InputError(f"unknown --executor {cfg.executor!r}; choose one of {', '.join(EXECUTORS)}")
    if cfg.branch_index is not None and cfg.executor != "inline":
        raise InputError("--branch-index trains one branch in this process; leave out --executor")
    if world_size() > 1 and cfg.branch_index is None:  # each process would merge and write the same folders
        raise InputError(f"a launch of {world_size()} processes (torchrun, accelerate launch) trains one branch of bam: "
                         "add --branch-index K, and merge with --merge-only in one process")
    workers = _branch_workers(cfg)
    executor, threads = executor_for(ExecutorOptions(cfg.executor, cfg.jobs, cfg.branch_cpus, cfg.branch_gpus,
                                                     cfg.branch_workers), K)
    base = Path(model_path or tc.model)
    out, work = Path(tc.output), cfg.work_dir
    # an input file may sit beside the outputs, but no output may be or contain an input
    inputs = [("model", base), ("data", Path(tc.data))] + ([("replay", Path(tc.replay))] if tc.replay else [])
    check_output_folder(work, inputs, overwrite=True)
    if cfg.branch_index is None:  # a run that may end by writing OUT
        check_output_folder(out, inputs + [("work folder", work)], tc.overwrite)
    method, params = merge_choice(K, cfg.merge, cfg.merge_params)
    examples = read_examples(Path(tc.data), tc.task)
    slices = split_slices(len(examples), K * R, tc.seed)
    _open_work(work, fingerprint(cfg, base), cfg.restart)

    rounds_log: list[dict[str, Any]] = []
    start = base
    done_branches = 0
    for j in range(1, R + 1):
        rdir = work / f"round_{j}"
        merged = rdir / "merged"
        if (rdir / MERGE_DONE).is_file() and merged.is_dir():
            record = json.loads((rdir / MERGE_DONE).read_text())
            rounds_log.append({**record, "skipped": True, "branches": [{**b, "skipped": True} for b in record["branches"]]})
            done_branches += K
            tell(f"round {j}: already merged, skipped")
            tick("rounds", j, R)
            tick("branches", done_branches, K * R)
            start = merged
            continue
        finished: dict[int, dict[str, Any]] = {}
        todo: list[BranchJob] = []
        for k in range(1, K + 1):
            bdir = rdir / f"branch_{k}"
            index = (j - 1) * K + (k - 1)
            if (bdir / DONE).is_file():
                finished[k] = {**json.loads((bdir / DONE).read_text()), "skipped": True}
                tell(f"round {j} branch {k}: finished earlier, skipped")
                done_branches += 1
                tick("branches", done_branches, K * R)
            elif cfg.merge_only:
                tell(f"round {j} branch {k} is not finished; nothing more to merge")
                return BamResult(None, {"rounds": rounds_log})
            elif cfg.branch_index is not None and k != cfg.branch_index:
                continue  # another process trains it
            else:
                todo.append(BranchJob(tc, start, bdir, j, k, index, [examples[i] for i in slices[index]], slices[index],
                                      threads, workers))
        if todo:
            rdir.mkdir(parents=True, exist_ok=True)

            def trained(i: int, record: dict[str, Any]) -> None:
                nonlocal done_branches
                finished[todo[i].branch] = {**record, "skipped": False}
                done_branches += 1
                tick("branches", done_branches, K * R)

            if executor.name != "inline":
                tell(f"round {j}: training {len(todo)} branch(es) with the {executor.name} executor")
            train = (lambda job: train_branch_job(job, tell)) if executor.name == "inline" else train_branch_job
            if workers is not None:
                train = train_branch_on_workers
            try:
                executor.run(train, todo, on_done=trained)
            except JobsFailed as exc:
                failed = ", ".join(str(todo[i].branch) for i in sorted(exc.failures))
                raise OutputError(f"round {j}: branch(es) {failed} failed ({exc}); finished branches are kept in {work}: "
                                  "rerun the same command to continue") from None
        branch_logs = [finished[k] for k in sorted(finished)]
        models = [rdir / f"branch_{k}" / finished[k]["model"] for k in sorted(finished)]
        if cfg.branch_index is not None:
            tell(f"round {j} branch {cfg.branch_index} is trained; rerun without --branch-index once all {K} are")
            return BamResult(None, {"rounds": [{"round": j, "branches": branch_logs}]})
        t0 = time.perf_counter()
        recipe = merge_recipe(method, params, start, models, tc.seed)
        tell(f"round {j}: merging {K} branches with {method} {params or ''}".rstrip())
        merge(recipe, merged, threads=cfg.merge_threads, overwrite=True, restart=True)
        record = {"round": j, "start_model": str(start), "branches": branch_logs,
                  "merge": {"method": method, "parameters": params, "seconds": time.perf_counter() - t0}}
        write_json_atomic(rdir / MERGE_DONE, record)
        rounds_log.append({**record, "skipped": False})
        tick("rounds", j, R)
        start = merged

    log = {
        "schema": SCHEMA, "model": str(tc.model), "data": str(tc.data), "replay": str(tc.replay) if tc.replay else None,
        "branches": K, "rounds": R, "examples": len(examples), "merge": {"method": method, "parameters": params},
        "train": json.loads(json.dumps(asdict(tc), default=str)), "work": str(work),
        "rounds_log": rounds_log, "seconds": time.time() - started,
    }
    with staged_output(out, tc.overwrite) as staging:
        for f in sorted(start.iterdir()):
            if f.is_file():
                shutil.copy2(f, staging / f.name)
        write_json_atomic(staging / LOG, log)
    return BamResult(out, log)


def _branch_workers(cfg: BamConfig) -> Optional[Workers]:
    """What each branch's Ray Train workers ask for (``--branch-workers N`` > 1), after checking they can run."""
    n = cfg.branch_workers
    if n < 1:
        raise InputError(f"--branch-workers must be at least 1, got {n}")
    if n == 1:
        return None
    alternative = (f"without Ray, train each branch on {n} processes with torchrun: torchrun --nproc_per_node {n} -m "
                   "deltawise bam ... --branch-index K for every K, then deltawise bam ... --merge-only")
    if cfg.executor != "ray":
        raise InputError(f"--branch-workers {n} trains each branch on {n} Ray Train workers and needs --executor ray "
                         f"(got {cfg.executor}); {alternative}")
    from deltawise.adapt.ray_train import import_ray_train

    import_ray_train(alternative)
    # a CPU run keeps gloo even when the workers hold GPUs; else Ray Train's choice (nccl with GPUs)
    return Workers(n, cfg.branch_cpus, cfg.branch_gpus, "gloo" if cfg.train.device == "cpu" else None)


def _slice_text(job: BranchJob) -> str:
    """The branch's slice as JSONL (``data.jsonl``)."""
    return "".join(json.dumps(_example_record(e, job.train.task), ensure_ascii=False) + "\n" for e in job.examples)


def _write_slice(job: BranchJob) -> Path:
    """Empty the branch folder (an unfinished branch, without a done marker, is redone from scratch) and write its slice."""
    if job.folder.exists():
        shutil.rmtree(job.folder)
    job.folder.mkdir(parents=True)
    data = job.folder / "data.jsonl"
    data.write_text(_slice_text(job), encoding="utf-8")
    return data


def _train_branch(job: BranchJob, data: Path, main: bool, tell: Note) -> Optional[dict[str, Any]]:
    """Train the branch on ``data`` (its slice); the process that writes (``main``) folds an adapter into the model
    and writes ``done.json``, and returns the record (the other ranks of a multi-process run: None)."""
    tc, start, bdir, j, k, index, examples, indices = (job.train, job.start, job.folder, job.round, job.branch, job.index,
                                                       job.examples, job.indices)
    tell(f"round {j} branch {k}: training {tc.method} on slice {index + 1} ({len(examples)} examples)")
    # every branch is its own run: the LR schedule (warmup + decay) restarts in each one
    cfg = dataclasses.replace(tc, model=start, data=data, output=bdir / "train", seed=tc.seed + index,
                              overwrite=True, progress=False)
    result = run_train(cfg)
    if not main:
        return None
    model = materialize(bdir / "train", start, bdir / "model", trust_remote_code=tc.trust_remote_code)
    record = {
        "round": j, "branch": k, "slice": index + 1, "examples": len(examples), "indices": indices,
        "start_model": str(start), "model": str(model.relative_to(bdir)), "steps": result.steps,
        "loss": _last_loss(result.log), "tokens": result.tokens, "seconds": result.seconds, "seed": cfg.seed,
    }
    write_json_atomic(bdir / DONE, record)  # last: the branch counts as finished only now
    loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
    tell(f"round {j} branch {k}: {result.steps} steps, loss {loss}, {result.tokens} tokens, {result.seconds:.1f} s")
    return record
