"""EVA, Explained Variance Adaptation (Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning
via Explained Variance Adaptation", arXiv 2410.07170): LoRA's data-driven initialisation (``-m lora -p init=eva``),
via PEFT (``init_lora_weights="eva"``, ``initialize_lora_eva_weights``).

For each adapted matrix, X holds its inputs on training batches (the tokens that are neither padding nor a
masked prompt; PEFT's label mask), centred: X = U S Vᵀ. The adapter starts as A = V_kᵀ, the k right-singular
vectors of largest singular value (the directions of largest activation variance), and B = 0, so the model
equals the base at init and LoRA starts learning in those directions. PEFT computes the SVD incrementally
(incremental PCA, one ``partial_fit`` per batch, cycling over the batches until the top components' cosine
similarity between two consecutive batches reaches ``eva_tau``; it gives up with an error after ``MAX_STEPS``
batches, or at once when no batch holds the ρ·r tokens a step needs).

Ranks are data-driven: each layer may take up to round(ρ·r) components, and the budget Σ r (r per adapted
layer) goes to the components with the largest explained variance ratio S_i² / Σ_j S_j² across all layers, so
k differs from layer to layer (a layer may get none and is then not adapted). The saved adapter records the
ranks in ``rank_pattern`` (and, with ``eva_adjust_scaling``, α_l = α·k/r in ``alpha_pattern``, so every layer
keeps the scale α/r); PEFT and deltawise's adapter reader (delta/peft_io.py) honour both. ``eva_whiten``
divides row i of A by √S_i. Layers with equal inputs (q_proj, k_proj, v_proj of one block) share one SVD.

The batches are rows of ``--data`` drawn with ``--seed``, as collated for training, one SVD step per global
batch: processes × ``--batch-size`` rows (one process: ``--batch-size``), so a run of N processes starts from
the adapter of one process with N times the batch, as its training steps equal that process's.

Several processes (DDP, FSDP): every process computes the SVD alone on those same global batches (PEFT's
``gather_distributed_inputs``, which all-gathers each layer's inputs from per-rank shards inside its hooks, is not
used: under FSDP the SVD runs on the CPU before sharding, where NCCL cannot gather, and a hook that stops on one
rank but not another would hang the collective). Then rank 0's result is sent to all (``share_rank0``): first
each layer's rank, then each A, before the Trainer wraps the model. An SVD that differs in its last bits between
devices can move a component across the rank budget and so change module shapes: without this step DDP stopped at
its parameter-shape check and FSDP at a gloo size mismatch (tried by hand with the skewed rank 1 of
tests/test_train_eva_ddp.py, which now passes), and equal shapes with different values would have trained a
different adapter per FSDP shard. ``--resume`` computes the initialisation again before loading the checkpoint
(same data and global batch, same ranks); the global batch's rows are in the run's key, so a resume with another
process count is refused instead of failing on shapes.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any, Callable, Optional

import torch
from torch import nn

from deltawise.adapt.dist import broadcast_from_rank0, is_distributed, world_size
from deltawise.adapt.methods.base import MethodError
from deltawise.params import Param

EVA_PARAMS: tuple[Param, ...] = (
    Param("init", str, "kaiming", choices=("kaiming", "eva"),
          help="A at init: kaiming (Kaiming-uniform, PEFT's default) or eva (the top right-singular vectors of each "
               "layer's inputs on training batches, ranks redistributed by explained variance; Paischer et al. 2024)"),
    Param("eva_rho", float, 2.0, low=1.0,
          help="init=eva: a layer may take up to rho·rank components (PEFT's default 2; 1: no redistribution)"),
    Param("eva_tau", float, 0.99, low=0.0, high=1.0, high_open=True,
          help="init=eva: the incremental SVD stops once its components' cosine similarity between two batches "
               "reaches tau (PEFT's default 0.99)"),
    Param("eva_whiten", bool, False, help="init=eva: divide each row of A by the square root of its singular value on "
                                          "the inputs the SVD read (PEFT's default false)"),
    Param("eva_adjust_scaling", bool, True,
          help="init=eva: a layer given k components gets alpha·k/rank, so its scale stays alpha/rank (without "
               "rslora; PEFT's adjust_scaling_factors, default true)"),
    Param("eva_batches", int, None, low=1,
          help="init=eva: training batches (processes × --batch-size rows, drawn with --seed) the SVD reads, cycled "
               "until it converges; default: all of --data (PEFT's guide: the fine-tuning dataloader)"),
)
MAX_STEPS = 1000  # SVD steps (batches) before EVA gives up on convergence (PEFT's loop would cycle forever)


def eva_requested(values: Mapping[str, Any]) -> bool:
    return values.get("init") == "eva"


def check_eva_values(values: Mapping[str, Any], given: Mapping[str, Any] | None) -> None:
    """An ``eva_*`` setting without ``init=eva`` would be ignored: refuse it."""
    stray = sorted(name for name in given or {} if name.startswith("eva_"))
    if stray and not eva_requested(values):
        raise MethodError(f"{', '.join(stray)} {'is an EVA setting' if len(stray) == 1 else 'are EVA settings'}: "
                          "add -p init=eva")


def eva_lora_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``LoraConfig`` keywords of an EVA initialisation (none unless ``init=eva``)."""
    if not eva_requested(values):
        return {}
    from peft import EvaConfig

    config = EvaConfig(rho=values["eva_rho"], tau=values["eva_tau"], whiten=values["eva_whiten"],
                       adjust_scaling_factors=values["eva_adjust_scaling"])
    return {"init_lora_weights": "eva", "eva_config": config}


class _Batches:
    """The first ``limit`` batches of ``loader`` (all when None), with a per-sequence classification label
    dropped: PEFT's label mask reads ``labels`` per token. Has a length, as PEFT asks."""

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]], limit: Optional[int]):
        self.loader, self.limit = loader, limit

    def __len__(self) -> int:
        size = len(self.loader)  # type: ignore[arg-type]
        return size if self.limit is None else min(size, self.limit)

    def __iter__(self):
        for batch in islice(self.loader, self.limit):
            yield {k: v for k, v in batch.items() if not (k == "labels" and v.dim() < 2)}


def _tokens_read(inputs: Mapping[str, torch.Tensor]) -> int:
    """The tokens of a batch PEFT's SVD reads: not padding, and not label-masked (a prompt) where labels are per token."""
    mask = inputs["attention_mask"].bool()
    labels = inputs.get("labels")
    return int((mask & (labels != -100) if labels is not None and labels.dim() == 2 else mask).sum())


def share_rank0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's EVA result (PEFT's ``eva_state_dict``: adapted module -> A, one row per component) on every process
    of a multi-process run; in one process, ``state`` itself. The ranks go first, as they fix the shapes the others
    receive A into. Every process holds the same modules (the same model and targets), named in the same order."""
    if not is_distributed():
        return state
    names = sorted(state)
    ranks = broadcast_from_rank0(torch.tensor([state[n].shape[0] for n in names], dtype=torch.int64))
    shared = {}
    for name, k in zip(names, ranks.tolist()):
        a = state[name] if state[name].shape[0] == k else state[name].new_empty((k, *state[name].shape[1:]))
        shared[name] = broadcast_from_rank0(a.contiguous()) if k else a
    return shared


def initialise_eva(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]], values: Mapping[str, Any],
                   device: torch.device | str | None = None, note: Optional[Callable[[str], None]] = None) -> dict[str, int]:
    """Run PEFT's EVA on the prepared PEFT model ``model`` (built with ``eva_lora_kwargs``) over the first
    ``eva_batches`` batches of ``loader``; returns each adapted module's rank."""
    from peft import get_eva_state_dict, initialize_lora_eva_weights

    batches = _Batches(loader, values["eva_batches"])
    if len(batches) == 0:
        raise MethodError("init=eva: no training batch to compute the SVD on")
    if device is not None:
        model.to(device)
    layers = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    need = round(values["eva_rho"] * values["rank"])  # PEFT skips a batch with fewer tokens than components
    steps, usable = 0, False
    if note is not None:
        note(f"EVA: SVD of the inputs of {layers} layers on up to {len(batches)} training batches "
             f"(rho {values['eva_rho']:g}, tau {values['eva_tau']:g})")

    def forward(model: nn.Module, inputs: dict[str, torch.Tensor]):
        nonlocal steps, usable
        steps += 1
        usable = usable or _tokens_read(inputs) >= need
        if steps > len(batches) + 1 and not usable:  # every batch seen (after PEFT's first look), none usable
            raise MethodError(f"init=eva: every batch holds fewer tokens than rho·rank = {need} components (PEFT "
                              "skips such batches): raise --batch-size, or lower -p eva_rho or -p rank")
        if steps > MAX_STEPS + 1:
            raise MethodError(f"init=eva: the SVD did not converge in {MAX_STEPS} batches; lower -p eva_tau "
                              f"(now {values['eva_tau']:g})")
        return model(**inputs)

    try:  # PEFT prints a line per layer for each batch it skips: the checks above say it once
        with contextlib.redirect_stdout(io.StringIO()):
            state = get_eva_state_dict(model, dataloader=batches, forward_fn=forward, show_progress_bar=False,
                                       gather_distributed_inputs=False)  # every process reads the same batches
    except ValueError as exc:
        raise MethodError(f"init=eva: {exc}") from None
    initialize_lora_eva_weights(model, eva_state_dict=share_rank0(state))
    ranks = {name.removeprefix("base_model.model."): m.lora_A["default"].weight.shape[0]
             for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if not ranks:
        raise MethodError("init=eva left no layer adapted")
    if note is not None:
        shared = f"; rank 0's adapter sent to all {world_size()} processes" if is_distributed() else ""
        note(f"EVA: {steps - 1} SVD steps{shared}; ranks {min(ranks.values())}..{max(ranks.values())} over {len(ranks)} "
             f"layers (budget {values['rank'] * layers}), {layers - len(ranks)} layers left unadapted")
    return ranks
