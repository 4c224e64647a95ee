"""Evaluation during training (``--eval-data``/``--eval-every``) through Trainer's own evaluation loop.

Trainer's ``eval_loss`` averages each batch's mean loss, weighted by the nominal batch size, so it moves
with how tokens fall into batches. Here ``preprocess_logits_for_metrics`` reduces each example's logits to
its summed loss and its count (tokens for a causal LM, 1 for a classifier) before Trainer gathers them
across processes, and ``compute_metrics`` divides the sums: ``eval_loss`` is the mean cross-entropy per
label token over the whole set (the quantity the training loss estimates), ``eval_perplexity`` its
exponential; a classifier also gets ``eval_accuracy``. ``DeltawiseTrainer.evaluation_loop`` puts this
loss in the place of Trainer's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from deltawise.adapt.chat import IGNORE_INDEX

# outputs that are not logits: Trainer would try to gather a key-value cache along with them
IGNORE_OUTPUTS = ["past_key_values", "hidden_states", "attentions"]
LOSS_KEY = "summed_loss"  # what compute_metrics returns; the trainer moves it into eval_loss


def per_example_sums(task: str):
    """``preprocess_logits_for_metrics`` for ``task``: logits -> (loss sum, count, correct) per example."""

    def reduce(logits, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if task == "classification":
            loss = F.cross_entropy(logits.float(), labels, reduction="none")
            correct = (logits.argmax(-1) == labels).double()
            return torch.stack([loss.double(), torch.ones_like(correct), correct], 1)
        shifted, target = logits[:, :-1].float(), labels[:, 1:]
        loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="none").view(target.shape)
        counted = target != IGNORE_INDEX
        sums = torch.where(counted, loss, torch.zeros_like(loss)).double().sum(1)
        return torch.stack([sums, counted.double().sum(1), torch.zeros_like(sums)], 1)

    return reduce


def metrics_of(task: str):
    """``compute_metrics`` for ``task`` over the gathered per-example sums."""

    def compute(prediction) -> dict[str, float]:
        sums = np.asarray(prediction.predictions, dtype=np.float64).reshape(-1, 3)
        count = float(sums[:, 1].sum())
        mean = float(sums[:, 0].sum()) / max(count, 1.0)
        if task == "classification":
            return {LOSS_KEY: mean, "accuracy": float(sums[:, 2].sum()) / max(count, 1.0), "examples": count}
        return {LOSS_KEY: mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": count}

    return compute
