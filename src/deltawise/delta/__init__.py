"""Deltas as first-class objects: types, folders, PEFT interop, extract/apply/compress/transfer.

A fine-tuned model is ``base + delta``. Each tensor's delta has a type (``dense``, ``lowrank``,
``sparse``, ``ternary``, ``spectral``, ``tall``, and ``full`` for a new value taken as is); a
delta folder stores many of them with the identity of the base they belong to. ``DeltaReader`` reads
``base + delta`` like a checkpoint.
"""

from deltawise.delta.base import KINDS, TensorDelta
from deltawise.delta.dense import DenseDelta
from deltawise.delta.full import FullDelta
from deltawise.delta.lowrank import LowRankDelta
from deltawise.delta.sparse import MaskedDelta, SparseDelta
from deltawise.delta.spectral import SpectralDelta
from deltawise.delta.tall import TallDelta
from deltawise.delta.ternary import TernaryDelta

__all__ = [
    "KINDS", "TensorDelta", "DenseDelta", "FullDelta", "LowRankDelta", "MaskedDelta", "SparseDelta",
    "SpectralDelta", "TallDelta", "TernaryDelta",
]
