"""RegMean statistics: the Gram matrix of the inputs of every nn.Linear layer (Jin et al. 2023).

For a linear layer with inputs X (one row per token position, padding excluded) the file stores
``G = X^T X / n`` (in x in, float32) under ``<module>.gram``, where ``<module>.weight`` is the
layer's weight in the checkpoint, and the row counts ``n`` in the metadata (``rows``). The
official code stores the same running mean. Inputs are captured with forward hooks in batches
(padding rows dropped with the attention mask); a classification head applied to all positions
sees all real tokens, one applied to a pooled vector sees one row per example. Only nn.Linear is
hooked: GPT-2's Conv1D layers get no Gram and are averaged by the regmean merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from deltawise.data.tasks import batches
from deltawise.stats.collect import CollectOptions, finish, start
from deltawise.stats.names import checkpoint_names


@dataclass
class GramResult:
    out: Path
    task: str
    examples: int
    layers: int
    seconds: float


def gram_key(weight_name: str) -> Optional[str]:
    """The Gram tensor's name for a linear weight's checkpoint name (None: not a weight)."""
    return weight_name[: -len(".weight")] + ".gram" if weight_name.endswith(".weight") else None


@torch.no_grad()
def input_grams(model: torch.nn.Module, batch_iter, *, progress=None,
                total: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per nn.Linear module name: sum of x x^T over its real input rows, and the row count."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask_now: list[Optional[torch.Tensor]] = [None]

    def hook(name: str):
        def record(module, inputs, output):
            x = inputs[0].detach()
            mask = mask_now[0]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]  # drop padding positions
            x = x.reshape(-1, x.shape[-1]).float()
            g = x.T @ x
            if name in sums:
                sums[name].add_(g)
            else:
                sums[name] = g
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        done = 0
        for batch in batch_iter:
            mask_now[0] = batch["attention_mask"]
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            done += batch["input_ids"].shape[0]
            if progress is not None:
                progress(done, total)
    finally:
        for h in handles:
            h.remove()
    return sums, counts


def compute_grams(model: str, data: Path, out: Path, options: CollectOptions) -> GramResult:
    """``deltawise gram``: write the input Gram matrices of MODEL's linear layers on DATA to OUT."""
    run = start(model, data, out, options)
    names = checkpoint_names(run.lm.model, run.reader)
    sums, counts = input_grams(run.lm.model, batches(run.lm, run.rows, run.data.task, options.batch_size),
                               progress=options.progress, total=len(run.rows))
    tensors, rows = {}, {}
    for module, g in sums.items():
        ckpt = names.get(f"{module}.weight" if module else "weight")
        key = gram_key(ckpt) if ckpt else None
        if key is None or counts[module] == 0:
            continue  # a tied output projection: its weight is the input embedding, which is averaged
        tensors[key] = (g / counts[module]).cpu()
        rows[key] = counts[module]
    seconds = finish(run, out, tensors, run.metadata("gram", rows=rows, max_length=options.max_length))
    return GramResult(out, run.data.task, len(run.rows), len(tensors), seconds)
