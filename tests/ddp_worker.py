"""Run by ``torchrun`` in tests/test_train_ddp.py and tests/test_train_fsdp.py (and by hand): train several methods in one
multi-process launch and save every rank's final weights.

    torchrun --nproc_per_node 2 tests/ddp_worker.py SPEC.json

SPEC.json: {"model": ..., "data": ..., "out": ..., "runs": [{"name": ..., "method": ..., "task": ...,
"method_params": {...}, "train": {...TrainConfig fields...}}]}. Each run writes ``out/NAME`` (rank 0) and
``out/NAME.rank{R}.safetensors`` (every rank's parameters when training ended). A run with ``"save_init": true``
also writes ``out/NAME.init{R}.safetensors`` (the trainable parameters when training began, as the wrapped model
holds them), and one with ``"skew_rank1_init": true`` hands rank 1 other batches for its data-driven
initialisation (another seed, 3 rows a batch), as a device whose SVD differs from rank 0's would. A run with
``"guard": {"retain": [[FILE, MIN]], "targets": [...], "options": {...GuardOptions fields...}}`` trains under the
retention guard (``guarded_train``) and writes ``out/NAME.guard{R}.json`` (every rank's checks and decisions). A run
with ``"stop_at": STEP`` is interrupted at the end of that step on every rank (its staging folder stays for a later
run with ``"resume": true`` in ``train``); ``"output": DIR`` trains into ``out/DIR`` instead of ``out/NAME``.
``two_ranks_and_one`` is the tests' side: it launches this file and trains the single-process references (of every
run without ``"launch_only": true``).
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
        self.save(model)

    def save(self, model, trainable_only: bool = False) -> None:
        from safetensors.torch import save_file

        from deltawise.adapt.sharding import full_parameters, is_sharded

        sharded = is_sharded(model)  # recorded, so that the FSDP test knows the run really was sharded
        with full_parameters(model, keep=True) as full:  # FSDP: every rank gathers its full weights
            save_file({n: p.detach().cpu().contiguous() for n, p in full.named_parameters()
                       if p.requires_grad or not trainable_only}, str(self.path), metadata={"sharded": str(sharded)})


class SaveInit(SaveWeights):
    """Saves the trainable parameters when training begins (the model already wrapped in DDP or sharded)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        pass

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.save(model, trainable_only=True)


def config(spec: dict, run: dict, out: Path):
    from deltawise.adapt import TrainConfig

    return TrainConfig(model=Path(spec["model"]), data=Path(run.get("data", spec["data"])), output=out, method=run["method"],
                       task=run.get("task", "causal_lm"), progress=False, method_params=run.get("method_params", {}),
                       **run.get("train", {}))


class Interrupted(Exception):
    pass


class StopAt(TrainerCallback):
    """Raises at the end of optimizer step ``step``, as a crash would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted


def train_run(cfg, run: dict, callbacks: list, guard_to: Path):
    """``run_train``, or ``guarded_train`` for a run with a ``guard``, whose state goes to ``guard_to``; None for a
    run interrupted by its ``stop_at``."""
    if run.get("stop_at"):
        try:
            return train_run(cfg, {k: v for k, v in run.items() if k != "stop_at"}, [*callbacks, StopAt(run["stop_at"])],
                             guard_to)
        except Interrupted:
            return None
    from dataclasses import asdict

    from deltawise.adapt import run_train

    if "guard" not in run:
        return run_train(cfg, callbacks=callbacks)
    from deltawise.adapt.guarded import GuardRequest, guarded_train
    from deltawise.options import GuardOptions
    from deltawise.search.budget import RetentionBudget

    g = run["guard"]
    request = GuardRequest(retain=[RetentionBudget(Path(f), m) for f, m in g["retain"]], targets=[Path(t) for t in g["targets"]],
                           options=GuardOptions(**g.get("options", {})))
    result = guarded_train(cfg, request, callbacks=callbacks)
    state = result.state
    guard_to.write_text(json.dumps({"points": [asdict(p) for p in state.points], "every": state.every,
                                    "kept_step": state.kept_step, "budget_met": state.budget_met,
                                    "stopped_early_at": state.stopped_early_at, "heldout": state.heldout}))
    return result.train


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(spec: dict, root: Path, env: dict[str, str] | None = None, timeout: float = 300) -> None:
    """``spec``'s runs under ``torchrun --nproc_per_node 2`` (gloo; ``env`` added to the launch's environment) into
    ``spec["out"]``, the spec written to ``root / "spec.json"``, within ``timeout`` seconds. Skips without gloo."""
    import os
    import subprocess

    import pytest
    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tests = Path(__file__).parent
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(tests / "ddp_worker.py"),
           str(root / "spec.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    # the rank that failed first prints its traceback early; the other ranks' barrier errors fill the tail
    first_error = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line)[:3000]
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n--- error lines ---\n" + first_error + \
        "\n--- stderr tail ---\n" + proc.stderr[-3000:]


def two_ranks_and_one(spec: dict, root: Path, env: dict[str, str] | None = None, timeout: float = 300) -> None:
    """``launch_two_ranks``, then the same runs (but those ``launch_only``) in this process with one thread and the
    global batch (twice each run's batch_size) into ``root / "single"`` as ``NAME``, ``NAME.single.safetensors``
    and, for a guarded run, ``NAME.guard.json``. Skips without gloo."""
    import torch

    launch_two_ranks(spec, root, env, timeout)
    single = {**spec, "out": str(root / "single")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run in spec["runs"]:
            if run.get("launch_only"):
                continue
            run = {**run, "train": {**run["train"], "batch_size": 2 * run["train"]["batch_size"]}}
            out = Path(single["out"])
            train_run(config(single, run, out / run["name"]), run, [SaveWeights(out / f"{run['name']}.single.safetensors")],
                      out / f"{run['name']}.guard.json")
    finally:
        torch.set_num_threads(threads)


def allow_fsdp_on_cpu() -> None:
    """accelerate turns ``ACCELERATE_USE_FSDP`` into FSDP only on accelerators; in a multi-CPU (gloo) launch it
    keeps plain DDP. Tests on a CPU machine mark the state FSDP after accelerate built it, so that its own
    FSDP2 preparation (``fully_shard``, optimizer, gradient clipping) runs on gloo as it runs on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # every later AcceleratorState() copies PartialState's type back: there too, or the checkpoint save
            # (accelerate's FSDP2 state dicts) would take the multi-CPU path and meet sharded tensors
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def main(spec_path: str) -> None:
    import os

    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        import torch

        if not torch.cuda.is_available():
            allow_fsdp_on_cpu()

    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["out"])
    import deltawise.adapt.train as train

    init_batches = train._init_batches
    for run in spec["runs"]:
        rank = int(os.environ.get("RANK", "0"))  # the process group starts inside run_train
        callbacks = [SaveWeights(root / f"{run['name']}.rank{rank}.safetensors")]
        if run.get("save_init"):
            callbacks.append(SaveInit(root / f"{run['name']}.init{rank}.safetensors"))
        if run.get("skew_rank1_init") and rank == 1:
            train._init_batches = skewed(init_batches)
        try:
            result = train_run(config(spec, run, root / run.get("output", run["name"])), run, callbacks,
                               root / f"{run['name']}.guard{rank}.json")
        finally:
            train._init_batches = init_batches
        if result is not None and result.is_main_process:
            print(f"ok {run['name']} steps={result.steps}", flush=True)


def skewed(init_batches):
    """``train._init_batches`` drawing batches of 3 rows with another seed (on tests/adapt_util.py's data: other EVA
    ranks, tests/test_train_eva_ddp.py)."""
    from dataclasses import replace

    return lambda rows, pad_id, cfg, size: init_batches(rows, pad_id, replace(cfg, seed=cfg.seed + 1), 3)


if __name__ == "__main__":
    main(sys.argv[1])
