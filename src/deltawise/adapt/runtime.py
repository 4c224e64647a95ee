"""Where and in what precision a training run computes: ``--device``, ``--dtype`` and
``--gradient-checkpointing`` turned into transformers ``TrainingArguments`` settings.

Mixed precision keeps the weights, gradients and optimizer states in float32 and runs the forward and
backward passes under autocast (``bf16=True`` / ``fp16=True`` in Trainer, which also adds the loss scaler
float16 needs), so ``--dtype`` changes speed and memory of the compute, never what is stored.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from deltawise.errors import InputError

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
