"""Bit-packed boolean masks (8 entries per byte), so masks and signs cost one bit on disk."""

from __future__ import annotations

import numpy as np
import torch


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flatten (row-major) and pack a boolean tensor into uint8; the last byte is zero-padded."""
    flat = mask.detach().to("cpu", torch.bool).reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat)).clone()


def unpack_bits(packed: torch.Tensor, numel: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` bits as a bool tensor of ``shape``."""
    bits = np.unpackbits(packed.detach().to("cpu", torch.uint8).numpy(), count=numel).astype(bool)
    out = torch.from_numpy(bits)
    return out.reshape(shape) if shape is not None else out
