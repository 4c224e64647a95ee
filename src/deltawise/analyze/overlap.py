"""How several task vectors interact, per tensor: sign conflicts and TALL-mask overlaps."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SignConflict:
    entries: int
    conflicts: int  # entries where some task vector is > 0 and another < 0
    overlapping: int  # entries where at least two task vectors are non-zero

    @property
    def rate(self) -> float:
        return self.conflicts / self.entries if self.entries else 0.0

    @property
    def rate_among_overlap(self) -> float:
        return self.conflicts / self.overlapping if self.overlapping else 0.0


def sign_conflict(deltas: list[torch.Tensor]) -> SignConflict:
    """Zero entries carry no sign (sgn(0) = 0) and never conflict."""
    signs = torch.stack([torch.sign(d.float()) for d in deltas])
    conflict = (signs > 0).any(0) & (signs < 0).any(0)
    overlapping = (signs != 0).sum(0) >= 2
    return SignConflict(entries=signs[0].numel(), conflicts=int(conflict.sum()), overlapping=int(overlapping.sum()))


@dataclass(frozen=True)
class MaskOverlap:
    entries: int
    selfish: int  # selected by exactly one task's mask
    catastrophic: int  # selected by no mask
    selected: list[int]  # entries each task's mask selects
    intersections: list[list[int]]  # |m_i & m_j|
    unions: list[list[int]]  # |m_i | m_j|

    def jaccard(self) -> list[list[float]]:
        return [[i / u if u else 1.0 for i, u in zip(ri, ru)] for ri, ru in zip(self.intersections, self.unions)]


def tall_masks(deltas: list[torch.Tensor], lam: float) -> list[torch.Tensor]:
    """TALL masks (Wang et al. 2024, arXiv 2405.07813; nik-dim/tall_masks):
    m_t = 1[|tau_t| > lam * |tau_MTL - tau_t|] with tau_MTL = sum_t tau_t (the task-arithmetic
    variant). The paper picks lam per task on validation data; this data-free analysis uses one lam."""
    floats = [d.float() for d in deltas]
    mtl = torch.stack(floats).sum(0)
    return [d.abs() > lam * (mtl - d).abs() for d in floats]


def mask_overlap(deltas: list[torch.Tensor], lam: float) -> MaskOverlap:
    masks = tall_masks(deltas, lam)
    count = torch.stack(masks).sum(0)
    inter = [[int((a & b).sum()) for b in masks] for a in masks]
    union = [[int((a | b).sum()) for b in masks] for a in masks]
    return MaskOverlap(
        entries=count.numel(), selfish=int((count == 1).sum()), catastrophic=int((count == 0).sum()),
        selected=[int(m.sum()) for m in masks], intersections=inter, unions=union,
    )
