"""The training loop: transformers ``Trainer`` around a model prepared by one adaptation method.

Multi-GPU / multi-node runs come from launching the same command with ``accelerate launch`` or
``torchrun``: Trainer picks the distributed set-up up from the environment and wraps the model in
DDP (several CPU processes use the gloo backend). Every method trains under DDP: each process
prepares the model identically (same seed; rank 0's choice where a method picks from the weights),
so the run equals one process with ``processes × --batch-size`` examples per step.

The run trains into a staging folder next to the output and renames it into place at the end,
so an interrupted run never leaves a half-written output. Our own methods (kind ``delta``) save a
deltawise delta folder (``delta.json`` + shards, recording the base's identity) into it.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from deltawise.adapt.data import Collator, ReplayMixSampler, label_mapping, read_examples, tokenize
from deltawise.adapt.dist import world_size
from deltawise.adapt.methods import Method, get_method
from deltawise.errors import InputError, OutputError
from deltawise.io.output import output_lock, unwritable
from deltawise.io.reader import ModelReader
from deltawise.options import SCHEDULES, TrainingOptions

TASKS = ("causal_lm", "classification")


@dataclass(kw_only=True)
class TrainConfig(TrainingOptions):
    """One training run: what to train, on what, into where; the optimisation settings are the
    fields of ``TrainingOptions`` (deltawise/options.py, the same declaration the CLI's ``train``
    and ``bam`` read). ``method_params``: the method's parameters by name, as strings from the
    command line or typed values from Python."""

    model: Path
    data: Path
    output: Path
    method: str = "lora"
    task: str = "causal_lm"
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False  # run Python code shipped in the model folder (--trust-remote-code)
    allow_pickle: bool = False  # accept a .bin/.pt checkpoint, read with weights_only=True (--allow-pickle)
    # the method's parameters by name (raw text from the command line, or typed values); validated and
    # completed with the method's defaults by ``get_method``
    method_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    output: Path
    method: str
    trainable_params: int
    total_params: int
    steps: int
    seconds: float
    log: list[dict[str, Any]]
    tokens: int = 0  # tokens (attention-mask ones) the loss was computed on, in this process
    is_main_process: bool = True  # False on the other ranks of a multi-process run (they write nothing)


def _peak_rss_mb() -> float:
    # ru_maxrss is the kernel's true high-water mark (kB on Linux); psutil gives the current value
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, psutil.Process().memory_info().rss / 2**20)


def _make_trainer_class():
    from transformers import Trainer, TrainerCallback

    class _MethodHooks(TrainerCallback):
        """Runs the method's post-clipping, pre-step hook (e.g. SORSA's orthonormal gradient) and
        its post-step hook (e.g. LIFT's write-back and mask refresh)."""

        def __init__(self, method: Method, peak_lr: float):
            self.method, self.peak_lr = method, peak_lr
            self.model: nn.Module | None = None

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.method.before_optimizer_step(self.model, self.peak_lr)

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.method.after_optimizer_step(self.model, optimizer)

    class DeltawiseTrainer(Trainer):
        """Trainer plus: a method's extra loss and optimizer, the replay-mixing sampler (redrawn
        every epoch; the trainer calls its ``set_epoch``), and a log with tokens/s and memory."""

        def __init__(self, *a, method: Method, sampler: ReplayMixSampler | None, **kw):
            super().__init__(*a, **kw)
            self.method = method
            self.replay_sampler = sampler
            self.records: list[dict[str, Any]] = []
            self._tokens = 0
            self._tokens_at_log = 0
            self._time_at_log = time.perf_counter()

        def _get_train_sampler(self, train_dataset=None):
            if self.replay_sampler is not None:
                return self.replay_sampler
            return super()._get_train_sampler(train_dataset)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                opt = self.method.make_optimizer(self.model, self.args.learning_rate, self.args.weight_decay,
                                                 self.args.max_grad_norm)
                if opt is not None:
                    self.optimizer = opt
                    return opt
            return super().create_optimizer(model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._tokens += int(inputs["attention_mask"].sum())
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            reg = self.method.regularizer(model)
            if reg is None:
                return result
            if return_outputs:
                return result[0] + reg, result[1]
            return result + reg

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            now = time.perf_counter()
            if "loss" in logs:
                # every process logs at the same steps: tokens are summed over processes, memory is
                # the largest process's
                mine = [self._tokens - self._tokens_at_log, psutil.Process().memory_info().rss / 2**20, _peak_rss_mb()]
                if torch.cuda.is_available():
                    mine.append(torch.cuda.max_memory_allocated() / 2**20)
                every = self.accelerator.gather(torch.tensor([mine], dtype=torch.float64, device=self.args.device)).cpu()
                logs = dict(logs)
                logs["tokens_per_s"] = float(every[:, 0].sum()) / max(now - self._time_at_log, 1e-9)
                logs["rss_mb"] = float(every[:, 1].max())
                logs["peak_rss_mb"] = float(every[:, 2].max())
                if torch.cuda.is_available():
                    logs["cuda_max_allocated_mb"] = float(every[:, 3].max())
                self.records.append({"step": self.state.global_step, **logs})
                self._tokens_at_log, self._time_at_log = self._tokens, now
            super().log(logs, *args, **kwargs)

    return DeltawiseTrainer, _MethodHooks


def _check_paths(cfg: TrainConfig) -> None:
    out = cfg.output.resolve()
    for src in [cfg.model, cfg.data] + ([cfg.replay] if cfg.replay else []):
        s = Path(src).resolve()
        if out == s or s.is_relative_to(out) or (s.is_dir() and out.is_relative_to(s)):
            raise OutputError(f"output {cfg.output} overlaps the input {src}; choose another output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise OutputError(f"output {cfg.output} exists and is not empty (pass --overwrite to replace it)")


def load_model(model_path: Path, task: str, num_labels: int | None = None, pad_token_id: int | None = None, *,
               trust_remote_code: bool = False) -> nn.Module:
    """Load the base model in float32 (optimizer states and updates need full precision). Code in the
    folder runs only with ``trust_remote_code`` (``deltawise.eval.models.refuse_remote_code``); a pickle
    checkpoint is read by transformers with ``torch.load(weights_only=True)``, once ``refuse_pickle`` let it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from deltawise.eval.models import refuse_remote_code

    refuse_remote_code(model_path, trust_remote_code)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels, dtype=torch.float32,
                                                                   trust_remote_code=trust_remote_code)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id  # needed to find the last token of padded rows
        return model
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=trust_remote_code)


def refuse_pickle(model_path: Path, allow_pickle: bool, label: str) -> None:
    """A folder whose weights are only a pickle checkpoint (.bin/.pt) is read only with ``--allow-pickle``:
    the README's promise, the same as merge's. ``ModelReader`` raises the refusal while indexing."""
    ModelReader(model_path, allow_pickle=allow_pickle, label=label).close()


def load_tokenizer(model_path: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from deltawise.eval.models import refuse_remote_code

    refuse_remote_code(model_path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a tokenizer from {model_path}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _lr_schedule(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if cfg.schedule == "cpt":
        # continual pre-training (Ibrahim et al. 2024, arXiv 2403.08763): re-warm linearly, then cosine down to min_lr_ratio·lr
        return {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": cfg.min_lr_ratio}}
    return {"lr_scheduler_type": cfg.schedule}


def _training_arguments(cfg: TrainConfig, output_dir: Path):
    """TrainingArguments for ``cfg``; building them sets up the process group of a multi-process launch."""
    from transformers import TrainingArguments
    from transformers.training_args import ParallelMode

    warmup = cfg.warmup if cfg.warmup < 1 else int(cfg.warmup)
    n_proc = world_size()
    # without this, accelerate on a machine with no accelerator starts the process group but trains
    # each process on its own (no DDP); with it, CPU processes train together over gloo
    use_cpu = n_proc > 1 and not torch.accelerator.is_available()
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        warmup_steps=warmup, logging_steps=cfg.logging_steps, save_strategy="no", report_to=[],
        seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=not cfg.progress, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=use_cpu, **_lr_schedule(cfg),
    )
    if n_proc > 1 and (args.parallel_mode != ParallelMode.DISTRIBUTED or args.world_size != n_proc):
        raise InputError(f"launched as {n_proc} processes, but transformers set up {args.world_size} "
                         f"({args.parallel_mode}); each process would train alone")
    return args


def run_train(cfg: TrainConfig, model_path: Path | None = None, callbacks: list | None = None) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and write the result to ``cfg.output``.

    ``model_path`` overrides ``cfg.model`` as the folder to load (the CLI passes the converted
    folder of a GGUF input here while ``cfg.model`` keeps what the user named). ``callbacks``:
    extra transformers ``TrainerCallback`` objects. In a multi-process run every process calls
    this; rank 0 writes the output and all return once it is in place.
    """
    from transformers import set_seed

    if cfg.task not in TASKS:
        raise InputError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    _check_paths(cfg)
    if not cfg.max_steps > 0 and not cfg.epochs > 0:
        raise InputError(f"--epochs {cfg.epochs:g} trains nothing; give --epochs > 0 or --max-steps > 0")
    model_path = Path(model_path or cfg.model)
    method = get_method(cfg.method, cfg.method_params)
    refuse_pickle(model_path, cfg.allow_pickle, str(cfg.model))
    tok = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)

    examples = read_examples(cfg.data, cfg.task)
    label2id = label_mapping(examples) if cfg.task == "classification" else None
    rows = tokenize(examples, tok, cfg.max_length, cfg.task, label2id)
    sampler = None
    if cfg.replay is not None:
        replay_rows = tokenize(read_examples(cfg.replay, cfg.task), tok, cfg.max_length, cfg.task, label2id)
        sampler = ReplayMixSampler(len(rows), len(replay_rows), cfg.batch_size, cfg.replay_fraction, cfg.seed)
        rows = rows + replay_rows  # the sampler's indices: target rows first, then replay rows

    held = ExitStack()
    try:
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        if int(os.environ.get("RANK", "0")) == 0:  # the process that writes the output locks it; the others only train
            held.enter_context(output_lock(cfg.output))
            _check_paths(cfg)  # again under the lock: another run may have written it meanwhile
        staging = cfg.output.parent / f".{cfg.output.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        held.close()
        raise unwritable(cfg.output, exc) from None
    except BaseException:
        held.close()
        raise
    try:
        # before the model is prepared, so a method may already talk to the other processes
        args = _training_arguments(cfg, staging / "_trainer")
        set_seed(cfg.seed)
        model = load_model(model_path, cfg.task, len(label2id) if label2id else None, tok.pad_token_id,
                           trust_remote_code=cfg.trust_remote_code)
        if label2id and any(isinstance(k, str) for k in label2id):
            # label names go into the saved config, so eval, fisher, soup ... accept the same JSONL
            model.config.label2id = dict(label2id)
            model.config.id2label = {i: name for name, i in label2id.items()}
        # a delta records the identity (fingerprint) of the weights it was trained from; transformers
        # has just loaded them, so a pickle checkpoint (allowed above) is read here too
        base = ModelReader(model_path, label=str(cfg.model), allow_pickle=cfg.allow_pickle) if method.kind == "delta" else None
        model = method.prepare(model, cfg.task, cfg.seed)
        trainable, total = method.count_params(model)
        method.before_training(model, staging)
        Trainer, Hooks = _make_trainer_class()
        hooks = Hooks(method, cfg.lr)
        trainer = Trainer(
            model=model, args=args, train_dataset=rows, data_collator=Collator(tok.pad_token_id, cfg.task),
            method=method, sampler=sampler, callbacks=[hooks, *(callbacks or [])],
        )
        hooks.model = trainer.model
        if not cfg.progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # without bars, Trainer would print every log dict instead
        if cfg.task == "classification":
            # sequence-classification heads take **kwargs but average their loss per batch and ignore
            # num_items_in_batch; left on, Trainer would multiply that mean by the process count
            trainer.model_accepts_loss_kwargs = False
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        shutil.rmtree(staging / "_trainer", ignore_errors=True)
        if trainer.is_world_process_zero():
            method.save(trainer.model, staging, base=base)
            tok.save_pretrained(staging)
            meta = {
                "method": method.name, "kind": method.kind, "base_model": str(cfg.model), "task": cfg.task,
                "trainable_params": trainable, "total_params": total,
                "label2id": {str(k): v for k, v in (label2id or {}).items()},
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                "method_params": method.values, "method_record": method.record(), "seconds": seconds,
                "steps": trainer.state.global_step,
            }
            (staging / "deltawise_train.json").write_text(json.dumps(meta, indent=2, default=str))
            (staging / "training_log.json").write_text(json.dumps(trainer.records, indent=2))
            for callback in callbacks or []:  # e.g. the retention guard (adapt/guard.py): its log, the final weights
                if hasattr(callback, "finish_output"):
                    callback.finish_output(staging, trainer.model,
                                           lambda folder: _save_to(method, trainer.model, tok, folder, base))
            _move_into_place(staging, cfg.output)
        trainer.accelerator.wait_for_everyone()  # every process returns once the output is in place
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        held.close()
    return TrainResult(cfg.output, method.name, trainable, total, trainer.state.global_step, seconds, trainer.records,
                       trainer._tokens, trainer.is_world_process_zero())


def _save_to(method: Method, model: nn.Module, tok, folder: Path, base: ModelReader | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    method.save(model, folder, base=base)
    tok.save_pretrained(folder)


def _move_into_place(staging: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
