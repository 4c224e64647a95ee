"""``deltawise compress DELTA --method compeft|topk``: shrink a delta tensor by tensor.

ComPEFT (Yadav et al. 2023, arXiv 2311.13171), per tensor: keep the top-``density`` fraction of entries by
magnitude (the top-k rule of the official TIES code: ``n_drop = d − int(d·k)``, threshold =
the ``n_drop``-th smallest ``|τ|``, keep ``|τ| ≥`` threshold; ``k = 1`` keeps all), and replace each
kept entry by ``sgn(τ) · α · σ(τ)``.

Scale rule (the paper's details are unverified here, so this is our choice):
``σ(τ)`` is the *population* standard deviation (ddof = 0) of the **dense** residual, taken
before sparsification. Why: the paper and the authors' TIES code scale by the residual's std;
computing it after zeroing would shrink it with the density (docs/deltas.md, scale rule);
ddof = 0 makes the rule exact on a zero-mean ternary input — a residual ``c · s`` with balanced
signs gives ``σ = c``, so ``density = 1, α = 1`` reproduces it — and the difference from ddof = 1
is negligible at real tensor sizes. ``α`` is the user's multiplier (tune it on validation data;
the default 1.0 keeps the residual's scale). Granularity is per tensor (the paper's is
unverified; per tensor bounds memory and suits LLMs).

``topk`` keeps the same entries with their exact values (a ``SparseDelta``): the baseline that
shows what the ternary quantisation itself costs. ``full`` entries (new values, such as a
trained classification head) are copied unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

import torch

from deltawise.delta.base import TensorDelta
from deltawise.delta.report import DeltaResult, Progress, TensorRow, relative_error, tick
from deltawise.delta.source import DeltaSource, open_delta
from deltawise.delta.sparse import SparseDelta
from deltawise.delta.store import DeltaWriter
from deltawise.delta.ternary import TernaryDelta
from deltawise.errors import DeltawiseError, InputError
from deltawise.io.finite import all_finite
from deltawise.io.dtypes import element_size
from deltawise.io.reader import ModelReader
from deltawise.io.resolve import resolve_model


def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of |tau| (the TIES code's top-k rule; ties at the threshold survive)."""
    d = tau.numel()
    n_drop = d - int(d * density)
    if n_drop <= 0:
        return torch.ones_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    threshold = magnitude.reshape(-1).kthvalue(n_drop).values
    return magnitude >= threshold


def compeft_scale(tau: torch.Tensor, alpha: float) -> float:
    return alpha * float(tau.double().std(unbiased=False)) if tau.numel() > 1 else alpha * float(tau.abs().max())


def compress_tensor(tau: torch.Tensor, method: str, density: float, alpha: float, dtype: torch.dtype) -> TensorDelta:
    # an entry that did not move is no part of the delta: storing it would only cost bytes (when more than
    # 1 - density of a tensor is exactly zero, e.g. embedding rows no example touched, the threshold is 0)
    mask = topk_mask(tau, density) & (tau != 0)
    if method == "compeft":
        return TernaryDelta.from_dense(tau, mask, compeft_scale(tau, alpha))
    return SparseDelta.from_dense(tau, mask, dtype)


def open_source(delta: str, base: Optional[str]) -> DeltaSource:
    base_reader = ModelReader(resolve_model(base), label=base) if base else None
    return open_delta(resolve_model(delta), base_reader=base_reader)


def compress_delta(
    delta: str, out: Path, *, method: Literal["compeft", "topk"] = "compeft", density: float = 0.1, alpha: float = 1.0,
    base: Optional[str] = None, overwrite: bool = False, progress: Optional[Progress] = None,
) -> DeltaResult:
    if not math.isfinite(alpha):
        raise DeltawiseError(f"--alpha must be a finite number, got {alpha}")
    if not 0 < density <= 1:
        raise DeltawiseError(f"--density is the kept fraction, in (0, 1]; got {density}")
    if method not in ("compeft", "topk"):
        raise DeltawiseError(f"unknown compression method {method!r}; use compeft, topk or tall")
    source = open_source(delta, base)
    delta_ref = delta  # the loop below reuses the name for each tensor's delta
    header = {"method": method,
              "parameters": {"density": density, "alpha": alpha} if method == "compeft" else {"density": density},
              "base": source.base,
              "source": {"ref": delta, "fingerprint": source.fingerprint(), "method": source.header.get("method")}}
    rows: list[TensorRow] = []
    names = source.names()
    with DeltaWriter(Path(out), header, [(delta, source.folder)], overwrite=overwrite) as writer:
        for i, name in enumerate(names, 1):
            base_dtype = source.base_dtype(name)
            delta = source.get(name)
            if delta.replaces:  # a new value (a new classification head) is not a difference: kept as is
                writer.add(name, delta, base_dtype)
                rows.append(TensorRow(name, delta.kind, delta.nbytes, delta.nbytes, 0.0))
                tick(progress, f"compressing ({method})", i, len(names))
                continue
            tau = delta.materialize(torch.float32)
            if not all_finite(tau):
                raise InputError(f"delta {delta_ref!r}: tensor {name!r} contains NaN or infinite values")
            compressed = compress_tensor(tau, method, density, alpha, base_dtype)
            restored = compressed.materialize()
            if not all_finite(restored):
                raise DeltawiseError(f"{method} produced NaN/inf for tensor {name!r}; check --alpha ({alpha:g})")
            writer.add(name, compressed, base_dtype)
            rows.append(TensorRow(name, compressed.kind, tau.numel() * element_size(base_dtype), compressed.nbytes,
                                  relative_error(restored, tau), {"kept": int(topk_mask(tau, density).sum())}))
            tick(progress, f"compressing ({method})", i, len(names))
        writer.finish(report={"tensors": {r.name: {"error": r.error, "ratio": r.ratio} for r in rows}})
    return DeltaResult(Path(out), rows, [], {"method": method, "density": density, "alpha": alpha})
