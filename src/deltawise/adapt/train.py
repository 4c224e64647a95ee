"""The training loop: transformers ``Trainer`` around a model prepared by one adaptation method.

Multi-GPU / multi-node runs come from launching the same command with ``accelerate launch`` or
``torchrun``: Trainer picks the distributed set-up up from the environment and wraps the model in
DDP (several CPU processes use the gloo backend). Every method trains under DDP: each process
prepares the model identically (same seed; rank 0's choice where a method picks from the weights),
so the run equals one process with ``processes × --batch-size`` examples per step.

The run trains into a staging folder next to the output and renames it into place at the end,
so an interrupted run never leaves a half-written output; with ``--save-every`` the folder keeps
checkpoints that ``--resume`` continues from (``deltawise.adapt.checkpoints``). Our own methods (kind
``delta``) save a deltawise delta folder (``delta.json`` + shards, recording the base's identity) into it.
Device and precision: ``deltawise.adapt.runtime``; evaluation during training:
``deltawise.adapt.evaluation``; progress and log lines: ``deltawise.adapt.reporting``.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import torch
from torch import nn

from deltawise.adapt.checkpoints import (RUN_FILE, TRAINER_DIR, checkpoint_step, discard_unless_resumable,
                                        latest_checkpoint, load_method_state, open_run_staging, previous_records, run_key,
                                        save_method_state)
from deltawise.adapt.data import Collator, ReplayMixSampler, label_mapping, read_examples, tokenize
from deltawise.adapt.evaluation import IGNORE_OUTPUTS, LOSS_KEY, metrics_of, per_example_sums
from deltawise.adapt.methods import Method, get_method
from deltawise.adapt.reporting import Note, Progress, reporter_callback
from deltawise.adapt.runtime import training_arguments
from deltawise.adapt.sharding import check_fsdp, fsdp_requested, full_parameters
from deltawise.errors import InputError, OutputError
from deltawise.io.output import output_lock, staging_folder, swap_into_place, unwritable
from deltawise.io.reader import ModelReader
from deltawise.options import CheckpointOptions, TrainingOptions

TASKS = ("causal_lm", "classification")


@dataclass(kw_only=True)
class TrainConfig(TrainingOptions, CheckpointOptions):
    """One training run: what to train, on what, into where; the optimisation settings are the
    fields of ``TrainingOptions`` (deltawise/options.py, the same declaration the CLI's ``train``
    and ``bam`` read), checkpoints and resuming those of ``CheckpointOptions`` (``train`` only).
    ``method_params``: the method's parameters by name, as strings from the command line or typed
    values from Python."""

    model: Path
    data: Path
    output: Path
    method: str = "lora"
    task: str = "causal_lm"
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    overwrite: bool = False
    progress: bool = True  # report through run_train's progress/note callbacks (transformers' own bars are never drawn)
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
        """Trainer plus: a method's extra loss, optimizer and after-backward hook, the replay-mixing sampler (redrawn
        every epoch; the trainer calls its ``set_epoch``), a log with tokens/s and memory, the
        token-weighted evaluation loss (``deltawise.adapt.evaluation``), and the method's own state in
        every checkpoint (``Method.resume_state``)."""

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

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.method.after_backward(self.model)
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if not model.training:
                return result  # evaluation: the task loss alone, and its tokens are not training tokens
            self._tokens += int(inputs["attention_mask"].sum())
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
            elif "eval_loss" in logs:
                self.records.append({"step": self.state.global_step, **logs})
            super().log(logs, *args, **kwargs)

        def evaluation_loop(self, *args, **kwargs):
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", "eval")
            if f"{prefix}_{LOSS_KEY}" in output.metrics:  # the token-weighted loss replaces Trainer's batch average
                output.metrics[f"{prefix}_loss"] = output.metrics.pop(f"{prefix}_{LOSS_KEY}")
            return output

        def _save_checkpoint(self, model, trial):
            if self.args.should_save:  # before Trainer's files: its trainer_state.json marks the checkpoint complete
                from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

                folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                save_method_state(self.method, folder)
                for callback in self.callback_handler.callbacks:  # e.g. the retention guard's state (adapt/guard.py)
                    if hasattr(callback, "save_checkpoint"):
                        callback.save_checkpoint(folder)
            super()._save_checkpoint(model, trial)

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is not None:
                load_method_state(self.method, self.model, self.optimizer, Path(checkpoint))

    return DeltawiseTrainer, _MethodHooks


def _check_paths(cfg: TrainConfig) -> None:
    out = cfg.output.resolve()
    for src in [cfg.model, cfg.data] + [p for p in (cfg.replay, cfg.eval_data) if p]:
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


def run_train(cfg: TrainConfig, model_path: Path | None = None, callbacks: list | None = None, *,
              progress: Optional[Progress] = None, note: Optional[Note] = None) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and write the result to ``cfg.output``.

    ``model_path`` overrides ``cfg.model`` as the folder to load (the CLI passes the converted
    folder of a GGUF input here while ``cfg.model`` keeps what the user named). ``callbacks``:
    extra transformers ``TrainerCallback`` objects. ``progress(stage, done, total)`` hears of every
    optimizer step and ``note`` gets one line per log (loss, evaluation), when ``cfg.progress``.
    In a multi-process run every process calls this; rank 0 writes the output and all return once
    it is in place.
    """
    from transformers import set_seed

    if cfg.task not in TASKS:
        raise InputError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    _check_paths(cfg)
    if not cfg.max_steps > 0 and not cfg.epochs > 0:
        raise InputError(f"--epochs {cfg.epochs:g} trains nothing; give --epochs > 0 or --max-steps > 0")
    if cfg.eval_every > 0 and cfg.eval_data is None:
        raise InputError("--eval-every needs --eval-data (the held-out data to evaluate on)")
    model_path = Path(model_path or cfg.model)
    method = get_method(cfg.method, cfg.method_params)
    check_fsdp(method.name, method.kind)
    # the data first: a file train cannot read is refused before a model is loaded
    examples = read_examples(cfg.data, cfg.task)
    eval_examples = read_examples(cfg.eval_data, cfg.task) if cfg.eval_data is not None else None
    refuse_pickle(model_path, cfg.allow_pickle, str(cfg.model))
    tok = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)

    label2id = label_mapping(examples) if cfg.task == "classification" else None
    unseen = {e.label for e in eval_examples or []} - {e.label for e in examples} if label2id else set()
    if unseen:
        raise InputError(f"{cfg.eval_data}: label(s) {sorted(map(str, unseen))} do not occur in --data; the classifier "
                         "learns only the training labels")
    rows = tokenize(examples, tok, cfg.max_length, cfg.task, label2id)
    eval_rows = tokenize(eval_examples, tok, cfg.max_length, cfg.task, label2id) if eval_examples else None
    target_rows = rows
    sampler = None
    if cfg.replay is not None:
        replay_rows = tokenize(read_examples(cfg.replay, cfg.task), tok, cfg.max_length, cfg.task, label2id)
        sampler = ReplayMixSampler(len(rows), len(replay_rows), cfg.batch_size, cfg.replay_fraction, cfg.seed)
        rows = rows + replay_rows  # the sampler's indices: target rows first, then replay rows

    staging = staging_folder(cfg.output)
    # before the staging folder: sets up the process group (the other ranks wait for rank 0's folder)
    # and checks device and dtype before anything is written
    args = training_arguments(cfg, staging / TRAINER_DIR)
    main = args.process_index == 0
    init_rows = cfg.batch_size * args.world_size  # a data-driven initialisation's batch: one global batch
    held = ExitStack()
    resume_from: Optional[Path] = None
    try:
        with args.main_process_first(local=False, desc="staging folder"):
            if main:  # the process that writes the output locks it and prepares its staging folder
                cfg.output.parent.mkdir(parents=True, exist_ok=True)
                held.enter_context(output_lock(cfg.output))
                _check_paths(cfg)  # again under the lock: another run may have written it meanwhile
                fingerprint = ModelReader(model_path, allow_pickle=cfg.allow_pickle, label=str(cfg.model)).fingerprint()
                key = run_key(cfg, method.values, fingerprint, init_rows if method.initialises_from_data() else None,
                              sharded=fsdp_requested(), processes=args.world_size)
                for callback in callbacks or []:  # e.g. the retention guard's settings: a resume must keep them
                    if hasattr(callback, "resume_key"):
                        key.update(callback.resume_key())
                staging, resume_from = open_run_staging(cfg.output, key, resume=cfg.resume)
            elif cfg.resume:
                resume_from = latest_checkpoint(staging)
    except OSError as exc:
        held.close()
        raise unwritable(cfg.output, exc) from None
    except BaseException:
        held.close()
        raise
    succeeded = False
    try:
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
        # a data-driven initialisation (LoRA's init=eva) reads global training batches; every process the same ones
        method.initialise(model, _init_batches(target_rows, tok.pad_token_id, cfg, init_rows), _init_device(args),
                          note if main and cfg.progress else None)
        trainable, total = method.count_params(model)
        # the other ranks of a multi-process run get a folder of their own: only rank 0's output is kept
        method.before_training(model, staging if main else Path(held.enter_context(tempfile.TemporaryDirectory())))
        Trainer, Hooks = _make_trainer_class()
        hooks = Hooks(method, cfg.lr)
        reporters = [reporter_callback(progress, note)] if cfg.progress and (progress or note) else []
        trainer = Trainer(
            model=model, args=args, train_dataset=rows, eval_dataset=eval_rows,
            data_collator=Collator(tok.pad_token_id, cfg.task), method=method, sampler=sampler,
            callbacks=[hooks, *reporters, *(callbacks or [])],
            compute_metrics=metrics_of(cfg.task) if eval_rows else None,
            preprocess_logits_for_metrics=per_example_sums(cfg.task) if eval_rows else None,
        )
        hooks.model = trainer.model
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # log lines go to ``note``; Trainer would print every log dict
        if cfg.task == "classification":
            # sequence-classification heads take **kwargs but average their loss per batch and ignore
            # num_items_in_batch; left on, Trainer would multiply that mean by the process count
            trainer.model_accepts_loss_kwargs = False
        earlier = previous_records(resume_from)  # read now: the checkpoint is rotated out once a newer one is kept
        for callback in (callbacks or []) if resume_from is not None else []:  # e.g. the retention guard's state
            if hasattr(callback, "load_checkpoint"):
                callback.load_checkpoint(resume_from)
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None, ignore_keys_for_eval=IGNORE_OUTPUTS)
        if eval_rows and not (trainer.records and trainer.records[-1].get("step") == trainer.state.global_step
                              and "eval_loss" in trainer.records[-1]):
            trainer.evaluate(ignore_keys=IGNORE_OUTPUTS)  # the final model, unless the last step was just evaluated
        seconds = time.perf_counter() - t0
        records = earlier + trainer.records
        # sharded (FSDP): every process gathers the full weights with the others, rank 0 saves them
        with full_parameters(trainer.model, keep=trainer.is_world_process_zero()) as trained:
            if trainer.is_world_process_zero():
                shutil.rmtree(staging / TRAINER_DIR, ignore_errors=True)
                method.save(trained, staging, base=base)
        if trainer.is_world_process_zero():
            tok.save_pretrained(staging)
            meta = {
                "method": method.name, "kind": method.kind, "base_model": str(cfg.model), "task": cfg.task,
                "trainable_params": trainable, "total_params": total,
                "label2id": {str(k): v for k, v in (label2id or {}).items()},
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                "method_params": method.values, "method_record": method.record(), "seconds": seconds,
                "steps": trainer.state.global_step, "resumed_from_step": checkpoint_step(resume_from),
            }
            (staging / "deltawise_train.json").write_text(json.dumps(meta, indent=2, default=str))
            (staging / "training_log.json").write_text(json.dumps(records, indent=2))
            for callback in callbacks or []:  # e.g. the retention guard (adapt/guard.py): its log, the final weights
                if hasattr(callback, "finish_output"):
                    callback.finish_output(staging, trainer.model,
                                           lambda folder: _save_to(method, trainer.model, tok, folder, base))
            (staging / RUN_FILE).unlink(missing_ok=True)
            swap_into_place(staging, cfg.output)
        trainer.accelerator.wait_for_everyone()  # every process returns once the output is in place
        succeeded = True
    finally:
        # a checkpoint (this run's, or the one a resumed run started from) stays for --resume
        if main and not succeeded and discard_unless_resumable(staging) and note is not None:
            note(f"kept the checkpoint in {staging}: rerun the command with --resume to continue")
        held.close()
    return TrainResult(cfg.output, method.name, trainable, total, trainer.state.global_step, seconds, records,
                       trainer._tokens, trainer.is_world_process_zero())


def _init_batches(rows: list[dict[str, Any]], pad_id: int, cfg: TrainConfig, size: int) -> torch.utils.data.DataLoader:
    """The training rows in batches of ``size`` (the global batch, processes × ``--batch-size``), collated as for
    training and shuffled with ``--seed`` (the same order in every process, and the order one process with that
    batch size reads), for a method's data-driven initialisation."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return torch.utils.data.DataLoader(rows, batch_size=size, shuffle=True, generator=generator,
                                       collate_fn=Collator(pad_id, cfg.task))


def _init_device(args) -> torch.device:
    """Where a data-driven initialisation runs: the training device (Trainer moves the model there anyway),
    except in a sharded run, whose model may not fit one device before FSDP splits it."""
    return torch.device("cpu") if fsdp_requested() else args.device


def _save_to(method: Method, model: nn.Module, tok, folder: Path, base: ModelReader | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    method.save(model, folder, base=base)
    tok.save_pretrained(folder)
