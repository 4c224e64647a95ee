"""Permutation specs and weight matching (Git Re-Basin), one permutation group at a time.

A ``PermGroup`` permutes ``size`` units; each ``Axis`` it touches is one axis of one tensor,
made of ``size`` contiguous blocks of ``block`` entries (block = 1 for hidden units, head_dim
for attention heads, group x head_dim for a GQA key/value group with its query heads). The
permuted tensor takes unit ``perm[i]`` of B at position i: ``B[perm, :]`` for rows.

Weight matching (Ainsworth et al. 2023, arXiv 2209.04836) maximises sum_T <A_T, P(B_T)>
by coordinate descent: visit the groups in a seeded random order; for group p,
    C = sum over (T, axis) in p of  A_T(axis first, flattened) @ B'_T(axis first, flattened)^T
with B' = B under every *other* group's current permutation; solve the assignment
max_pi sum_i C[i, pi(i)] (scipy's Hungarian solver); stop after a sweep with no gain > tol.
Only the tensors of one group (from both models) are in memory at a time; they are read
again at every visit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

Loader = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Axis:
    tensor: str
    axis: int
    block: int = 1


@dataclass
class PermGroup:
    name: str
    size: int
    axes: list[Axis] = field(default_factory=list)


def block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Entry indices along an axis for a permutation of its blocks."""
    if block == 1:
        return perm
    return (perm.view(-1, 1) * block + torch.arange(block)).reshape(-1)


def touching(spec: list[PermGroup]) -> dict[str, list[tuple[PermGroup, Axis]]]:
    """tensor name -> the (group, axis) pairs that permute it."""
    out: dict[str, list[tuple[PermGroup, Axis]]] = {}
    for group in spec:
        for ax in group.axes:
            out.setdefault(ax.tensor, []).append((group, ax))
    return out


def check_spec(spec: list[PermGroup], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    seen: dict[tuple[str, int], str] = {}
    for group in spec:
        tensors = [ax.tensor for ax in group.axes]
        if len(set(tensors)) != len(tensors):
            problems.append(f"permutation {group.name} touches a tensor twice")
        for ax in group.axes:
            shape = shapes.get(ax.tensor)
            if shape is None:
                problems.append(f"permutation {group.name}: no tensor {ax.tensor}")
            elif ax.axis >= len(shape) or shape[ax.axis] != group.size * ax.block:
                problems.append(f"permutation {group.name}: {ax.tensor} axis {ax.axis} is not {group.size} x {ax.block}")
            key = (ax.tensor, ax.axis)
            if key in seen:
                problems.append(f"{ax.tensor} axis {ax.axis} is permuted by both {seen[key]} and {group.name}")
            seen[key] = group.name
    return problems


def apply_perms(x: torch.Tensor, name: str, perms: dict[str, torch.Tensor], where: dict,
                skip: Optional[str] = None) -> torch.Tensor:
    """``x`` (the whole tensor ``name``) under every permutation in ``perms`` except ``skip``."""
    for group, ax in where.get(name, ()):
        if group.name != skip:
            x = x.index_select(ax.axis, block_index(perms[group.name], ax.block))
    return x


def _unit_rows(x: torch.Tensor, ax: Axis, size: int) -> torch.Tensor:
    """(size, rest): the units of ``ax`` as rows."""
    return x.movedim(ax.axis, 0).reshape(size, -1)


def weight_matching(
    spec: list[PermGroup],
    load_a: Loader,
    load_b: Loader,
    *,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-12,
    callback: Optional[Callable[[dict[str, torch.Tensor]], None]] = None,
) -> dict[str, torch.Tensor]:
    """Permutations of B's units that maximise sum <A, P(B)>; ``callback(perms)`` after each update."""
    from scipy.optimize import linear_sum_assignment

    where = touching(spec)
    perms = {g.name: torch.arange(g.size) for g in spec}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for gi in rng.permutation(len(spec)):
            group = spec[gi]
            cost = torch.zeros(group.size, group.size, dtype=torch.float64)
            for ax in group.axes:
                a = _unit_rows(load_a(ax.tensor).float(), ax, group.size)
                b = apply_perms(load_b(ax.tensor).float(), ax.tensor, perms, where, skip=group.name)
                cost += (a @ _unit_rows(b, ax, group.size).T).double()
                del a, b
            c = cost.numpy()
            _, cols = linear_sum_assignment(c, maximize=True)
            rows = np.arange(group.size)
            old = c[rows, perms[group.name].numpy()].sum()
            new = c[rows, cols].sum()
            progress = progress or new > old + tol
            perms[group.name] = torch.from_numpy(cols.astype(np.int64))
            if callback is not None:
                callback(perms)
        if not progress:
            break
    return perms
