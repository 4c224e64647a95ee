"""Small helpers for multi-process training (torchrun / accelerate launch): no-ops in one process.

Methods that choose something from the weights (LIFT's principal-weight masks) take rank 0's choice
on every rank, so all processes train the same entries even if a decomposition is not bit-for-bit
reproducible across devices. The retention guard (adapt/guard.py) shares its scores and decisions with
the object collectives below.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def world_size() -> int:
    """Processes in the run: the initialised process group's size, else the launcher's WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank: the initialised process group's, else the launcher's RANK (0 in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """``t`` as rank 0 holds it (in place where possible). NCCL only moves GPU tensors, so a CPU
    tensor makes a round trip through the current GPU there."""
    if not is_distributed():
        return t
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and t.device.type != "cuda":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.broadcast(on_gpu, src=0)
        t.copy_(on_gpu.to(t.device))
        return t
    torch.distributed.broadcast(t, src=0)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every process; ``obj`` itself in one process and on rank 0."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return obj if torch.distributed.get_rank() == 0 else box[0]
