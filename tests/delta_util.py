"""Helpers for the delta tests: fine-tunes with known, hand-made changes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


def edit_model(src: Path, dst: Path, changes: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Path:
    """Copy a model folder, replacing the named tensors by ``fn(tensor)``."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        state = load_file(f)
        hit = {k: fn(state[k]) for k, fn in changes.items() if k in state}
        if hit:
            state.update({k: v.contiguous() for k, v in hit.items()})
            save_file(state, f, metadata={"format": "pt"})
    return dst


def low_rank(shape: tuple[int, int], rank: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    """A matrix of exactly ``rank`` with well separated, non-tiny singular values."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(shape[0], rank, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], rank, generator=g, dtype=torch.float64))
    s = torch.linspace(1.0, 0.5, rank, dtype=torch.float64) * scale
    return ((U * s) @ V.T).float()
