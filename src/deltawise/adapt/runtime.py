"""How a training run computes: transformers ``TrainingArguments`` from a ``TrainConfig``, in particular
where and in what precision (``--device``, ``--dtype``, ``--gradient-checkpointing``).

Mixed precision keeps the weights, gradients and optimizer states in float32 and runs the forward and
backward passes under autocast (``bf16=True`` / ``fp16=True`` in Trainer, which also adds the loss scaler
float16 needs), so ``--dtype`` changes speed and memory of the compute, never what is stored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deltawise.adapt.dist import world_size
from deltawise.errors import InputError
from deltawise.options import SCHEDULES

if TYPE_CHECKING:
    from deltawise.adapt.train import TrainConfig

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_RULE = "use auto, cpu, cuda or cuda:N"


def resolve_device(name: str, n_processes: int = 1) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is there, else ``cpu``; ``cuda``/``cuda:N`` checked to
    exist. A multi-process launch gives each process the GPU of its local rank, so ``cuda:N`` is refused there."""
    name = name.strip().lower()
    if name == "auto":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return accelerator.type if accelerator is not None else "cpu"
    if name == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise InputError(f"unknown --device {name!r}; {DEVICE_RULE}")
    if not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available on this machine (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    if match.group(1) is not None:
        index, count = int(match.group(1)), torch.cuda.device_count()
        if index >= count:
            raise InputError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
        if n_processes > 1:
            raise InputError(f"--device {name} in a {n_processes}-process launch: each process takes the GPU of its "
                             "local rank; use --device cuda")
    return name


def check_dtype(dtype: str, device: str) -> None:
    """Refuse a compute dtype the device cannot run: float16 autocast needs a GPU, bfloat16 on CUDA needs
    Ampere or newer."""
    if dtype not in DTYPES:
        raise InputError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "float16" and device == "cpu":
        raise InputError("--dtype float16 needs a GPU: float16 mixed precision is not supported on the CPU; "
                         "use --dtype bfloat16 (or float32) there")
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise InputError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support bfloat16; use --dtype "
                         "float16 or float32")


def compute_arguments(device: str, dtype: str, gradient_checkpointing: bool, n_processes: int = 1) -> dict[str, Any]:
    """TrainingArguments keywords for the device, the compute dtype and activation checkpointing.

    ``use_cpu`` whenever the run is on the CPU: besides keeping an accelerator out, it is what makes a
    multi-process launch without an accelerator train together over gloo (accelerate would otherwise start
    the process group but train each process on its own)."""
    resolved = resolve_device(device, n_processes)
    check_dtype(dtype, resolved)
    if resolved.startswith("cuda:"):
        torch.cuda.set_device(resolved)  # Trainer places the model on the current CUDA device
    return {
        "use_cpu": resolved == "cpu", "bf16": dtype == "bfloat16", "fp16": dtype == "float16",
        "activation_checkpointing": gradient_checkpointing,
        "dataloader_pin_memory": resolved.startswith("cuda"),  # pinning without a GPU only earns a warning
    }


def _lr_schedule(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if cfg.schedule == "cpt":
        # continual pre-training (Ibrahim et al. 2024, arXiv 2403.08763): re-warm linearly, then cosine down to min_lr_ratio·lr
        return {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": cfg.min_lr_ratio}}
    return {"lr_scheduler_type": cfg.schedule}


def training_arguments(cfg: TrainConfig, output_dir: Path):
    """TrainingArguments for ``cfg``; building them sets up the process group of a multi-process launch."""
    from transformers import TrainingArguments
    from transformers.training_args import ParallelMode

    warmup = cfg.warmup if cfg.warmup < 1 else int(cfg.warmup)
    n_proc = world_size()
    evaluate = cfg.eval_data is not None and cfg.eval_every > 0
    save = cfg.save_every > 0
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        warmup_steps=warmup, logging_steps=cfg.logging_steps, report_to=[],
        eval_strategy="steps" if evaluate else "no", eval_steps=cfg.eval_every if evaluate else None,
        # one checkpoint is all --resume needs: the older one goes once the newer is complete
        save_strategy="steps" if save else "no", save_steps=cfg.save_every if save else None, save_total_limit=1,
        label_names=["labels"], seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, **compute_arguments(cfg.device, cfg.dtype, cfg.gradient_checkpointing, n_proc),
        **_lr_schedule(cfg),
    )
    if n_proc > 1 and (args.parallel_mode != ParallelMode.DISTRIBUTED or args.world_size != n_proc):
        raise InputError(f"launched as {n_proc} processes, but transformers set up {args.world_size} "
                         f"({args.parallel_mode}); each process would train alone")
    return args
