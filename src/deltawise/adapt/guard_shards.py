"""The retention guard's scoring split over the processes of a multi-process run (torchrun / accelerate DDP).

Every process holds the same weights after an optimizer step, so each scores a contiguous 1/N of every
monitor set's items and the per-item scores are all-gathered. The scores are additive:

    perplexity: NLL_total = sum_i NLL_i,  T_total = sum_i T_i,  ppl = exp(NLL_total / T_total)
    accuracy:   acc = sum_i correct_i / n

so ``combine`` rebuilds, in the items' order, exactly the result one process computes from the same per-item
scores, and the paired bootstrap intervals (eval/intervals.py, over items) are those of one process. What
may differ is each item's score in the last bits, as items are batched with other neighbours.
"""

from __future__ import annotations

import math
from typing import Optional

from deltawise.adapt.dist import all_gather_objects, is_distributed
from deltawise.data.tasks import TaskData
from deltawise.eval.results import DatasetResult


def shard(data: TaskData, rank: int, world: int) -> TaskData:
    """Process ``rank``'s contiguous share of ``data``'s items (items n·r/N to n·(r+1)/N; possibly none)."""
    n = len(data.items)
    return TaskData(data.path, data.task, data.items[n * rank // world : n * (rank + 1) // world])


def combine(parts: list[Optional[DatasetResult]]) -> DatasetResult:
    """One dataset's result from the processes' results on consecutive shards (None: a process had no item)."""
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    seconds = max(p.seconds for p in parts)
    n_items = sum(p.n_items for p in parts)
    if first.per_item_nll is not None:
        nll = {k: v for p in parts for k, v in (p.per_item_nll or {}).items()}
        tokens = {k: v for p in parts for k, v in (p.per_item_tokens or {}).items()}
        total, count = sum(nll.values()), sum(tokens.values())
        mean = total / count if count else float("nan")
        return first.model_copy(update={"value": math.exp(mean), "mean_nll": mean, "n_tokens": count, "n_items": n_items,
                                        "seconds": seconds, "tokens_per_s": count / seconds if seconds else None,
                                        "per_item_nll": nll, "per_item_tokens": tokens})
    per_item = {k: v for p in parts for k, v in (p.per_item or {}).items()}
    return first.model_copy(update={"value": sum(per_item.values()) / len(per_item), "n_items": n_items, "seconds": seconds,
                                    "per_item": per_item})


def gather_results(mine: list[Optional[DatasetResult]]) -> list[DatasetResult]:
    """Each dataset's combined result from every process's list (one collective; a no-op in one process)."""
    if not is_distributed():
        return [r for r in mine if r is not None]
    every = all_gather_objects(mine)
    return [combine([ranks[d] for ranks in every]) for d in range(len(mine))]
