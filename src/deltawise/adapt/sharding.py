"""Sharded training (FSDP2 through accelerate) for models larger than one device.

A user asks for it the way accelerate expects: ``accelerate launch --config_file fsdp.yaml`` with
``distributed_type: FSDP`` and ``fsdp_version: 2`` (docs/adapt.md, "Sharded training"), which sets
``ACCELERATE_USE_FSDP`` / ``FSDP_*`` in every process; transformers' Trainer then shards the prepared
model with torch's ``fully_shard``. Each parameter becomes a DTensor holding 1/N of its rows.

Two things are ours to get right: methods whose hooks need whole matrices, and saving.
Methods: LIFT gathers each whole matrix where it chooses its mask and writes each rank's rows of the masked
entries back (adapt/methods/lift.py); SORSA, KaSA and LoLDU decompose the whole weights before the model is
sharded, and SORSA's and KaSA's regularisers run on factors gathered with ``whole`` (every rank, in the same
order; each shard receives its rows of the gradient); OSF projects its sharded gradients after each backward
pass (adapt/methods/osf.py), since FSDP's shards do not carry PEFT's tensor hooks. PEFT's adapters shard as
any parameters; LoRA-FA's optimizer, whose (AAᵀ)⁻¹ needs the whole A, gathers every A each step
(adapt/methods/lora_fa.py); PiSSA, CorDA and EVA initialise before the model is sharded. A method not in
``FSDP_METHODS_OWN`` / ``FSDP_METHODS_PEFT`` (not tested sharded) is refused up front. Saving needs the full
tensors, which every process must gather together (a collective) before the main process writes them, so
``full_parameters`` swaps each sharded parameter for its gathered CPU copy for the duration of the save (with
FSDP's load hooks held back, for PiSSA's and CorDA's conversion, which loads an adapter into the model) and puts
the shards back afterwards. Checkpoints (``--save-every``/``--resume``) are the Trainer's FSDP ones.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from deltawise.errors import InputError

# the methods that run sharded, each tested so in tests/test_train_fsdp.py (LoRA's init=eva: tests/test_train_eva_ddp.py):
# ours (kind full or delta), and PEFT's adapters (kind peft), which train through transformers' FSDP support for
# PEFT models; bone is miss under its old name (one class)
FSDP_METHODS_OWN = ("full", "hft", "lift", "sorsa", "kasa", "loldu", "osf")
FSDP_METHODS_PEFT = ("lora", "lora_fa", "dora", "pissa", "corda", "randlora", "miss", "bone", "fourierft")


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (accelerate's environment variable, set by ``accelerate launch``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage of an ``accelerate launch`` with DeepSpeed (from its config keys or its JSON file), else None."""
    import json

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    try:
        stage = json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage") if path else None
    except (OSError, ValueError):
        return None  # accelerate reports an unreadable DeepSpeed config itself
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def check_fsdp(method_name: str, method_kind: str) -> None:
    """Refuse a sharded run we cannot do correctly, before a model is loaded."""
    if deepspeed_zero_stage() == 3:
        raise InputError("DeepSpeed ZeRO-3 is not supported: its partitioned parameters would be saved empty; use FSDP "
                         "(fsdp_version: 2) to shard a model, or ZeRO-1/2 (docs/adapt.md, \"Sharded training\")")
    if not fsdp_requested():
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise InputError(f"FSDP version {version} is not supported: set fsdp_version: 2 in the accelerate config "
                         "(torch's fully_shard; docs/adapt.md, \"Sharded training\")")
    if method_name not in (FSDP_METHODS_PEFT if method_kind == "peft" else FSDP_METHODS_OWN):
        raise InputError(f"-m {method_name} does not run sharded (FSDP): it is not tested with sharded parameters; "
                         f"use {', '.join(FSDP_METHODS_OWN + FSDP_METHODS_PEFT)}, or DDP if the model fits one device")


@contextmanager
def full_parameters(model: nn.Module, keep: bool) -> Iterator[nn.Module]:
    """Within the block, ``model``'s sharded parameters are full CPU tensors on processes with ``keep``.

    Every process must enter (each DTensor is all-gathered, one parameter at a time, so the peak is
    one full matrix per device). Without sharded parameters (one process, DDP) nothing happens. Tied
    parameters (one object in several modules) are gathered once and stay tied. A module holding a
    gathered parameter loses its ``load_state_dict`` post-hooks for the block: FSDP2's would take the
    module's plain tensor for its shard and fail, and a save may load into the model (PiSSA's and CorDA's
    conversion loads the initial adapter beside the trained one)."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    hooks: dict[nn.Module, dict] = {}
    gathered: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not isinstance(param, DTensor):
                    continue
                if id(param) not in gathered:
                    full = param.detach().full_tensor().cpu()
                    gathered[id(param)] = nn.Parameter(full, requires_grad=param.requires_grad)
                if keep:
                    swapped.append((module, name, param))
                    module._parameters[name] = gathered[id(param)]
                    if module not in hooks:
                        hooks[module] = module._load_state_dict_post_hooks
                        module._load_state_dict_post_hooks = OrderedDict()
        yield model
    finally:
        for module, name, param in reversed(swapped):
            module._parameters[name] = param
        for module, held in hooks.items():
            module._load_state_dict_post_hooks = held
        gathered.clear()


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded (DTensor) ``t`` is all-gathered, a collective every rank must call in the same order;
    a plain tensor is returned as it is. Differentiable: the gradient of each rank's rows reaches its shard (no
    communication), so a term every rank computes alike from whole tensors gives each shard its full gradient."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of ``t`` this rank holds (all of a plain tensor) and the index of the first one.

    FSDP2 shards a parameter by rows (``Shard(0)``, as ``torch.chunk`` splits: ceil(m/N) rows a rank)."""
    from torch.distributed.tensor import DTensor, Shard

    from deltawise.adapt.methods.base import MethodError

    if not isinstance(t, DTensor):
        return t.data, 0
    if tuple(t.placements) != (Shard(0),):
        raise MethodError(f"sharded training needs parameters split by rows (Shard(0)), not {t.placements}")
    m, size, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    start = min(rank * -(-m // size), m)
    local = t.to_local()
    if start + local.shape[0] > m:
        raise MethodError(f"unexpected shard of {tuple(t.shape)}: {tuple(local.shape)} rows from row {start}")
    return local, start


@torch.no_grad()
def assign_rows(t: torch.Tensor, full: torch.Tensor) -> None:
    """Set ``t`` (plain or sharded by rows) to ``full``, in place: a shard takes its own rows."""
    local, start = local_rows(t)
    local.copy_(full[start:start + local.shape[0]].to(local.dtype))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())

