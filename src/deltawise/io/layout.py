"""How tensors are walked and written: the row-chunk size every streaming pass uses, the default
shard size, and the order tensors are visited in. One place, so the merge engine, continual merging
and ``apply`` chunk and order tensors alike."""

from __future__ import annotations

import re

CHUNK_ELEMENTS = 1 << 20  # 1M entries per row chunk: 4 MB per float32 operand
SHARD_BYTES = 5 * 10**9  # largest output shard unless the user says otherwise (as transformers' 5GB)


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
