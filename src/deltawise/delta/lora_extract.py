"""``deltawise extract FT --base BASE --lora``: a PEFT LoRA adapter approximating ``θ_ft − θ_base``.

Each changed 2-D linear weight delta ``ΔW = U S Vᵀ`` (SVD in float32, float64 for float64
weights) is truncated to rank ``k`` and split evenly, ``B = U_k √S_k``, ``A = √S_k V_kᵀ`` (so
``B A`` is the best rank-``k`` approximation, Eckart–Young). ``k`` is ``rank``, or with
``energy`` the smallest ``k`` with ``Σ_{i≤k} s_i² ≥ energy · Σ s_i²`` (capped by ``rank`` when both
are given). The relative error per tensor is ``√(Σ_{i>k} s_i²) / ‖ΔW‖``.

With ``embeddings="lora"`` (``--adapter-embeddings lora``) each changed embedding table (token, position or
token-type ``nn.Embedding``: ``TensorRoles.is_indexed_table``) is cut the same way, from the SVD of ``ΔEᵀ``, and
written as PEFT's LoRA-embedding factors (``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r)).
Other changed tensors (biases, norms, embeddings with the default ``embeddings="whole"``) cannot be LoRA factors:
with ``non_linear="save"`` they are placed by the rule the merge's adapter output uses (``lora_layout``): the bias of
a linear layer as PEFT's ``lora_B.bias`` (``lora_bias: true``; zero rank-1 factors when its weight did not change),
beside LoRA embeddings as the layer's new ``base_layer.bias``, saved whole when some LoRA module's base layer has no
bias; the others' fine-tuned values go into ``modules_to_save`` (PEFT then replaces the whole module, a LoRA weight
there included). So a full fine-tune of a BERT-style model, whose linear biases train too, extracts with the defaults.
With ``"skip"`` they are all left out with a warning (an adapter of LoRA factors only).
A base with tied embeddings stores no output head, but PEFT replaces the input embedding module
only (and its LoRA on an embedding adapts the lookup only), leaving the (tied) head at the base value
in PeftModel's forward: a changed input embedding's head is therefore saved whole under the head's name
(as mergekit's ``mergekit-extract-lora`` does; for a LoRA embedding ``base + (B A)ᵀ``, with a warning), so
PeftModel computes the logits of ``deltawise apply`` (which reads the head back through the tie).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch

from deltawise.architecture import architecture_for
from deltawise.delta.lowrank import LowRankDelta
from deltawise.delta.lora_layout import lora_layout, tied_heads
from deltawise.delta.peft_io import write_peft_adapter
from deltawise.delta.report import DeltaResult, Progress, TensorRow, tick
from deltawise.delta.store import base_identity
from deltawise.delta.walk import open_pair
from deltawise.errors import DeltawiseError
from deltawise.io.output import check_output_folder, staged_output
from deltawise.options import check_embedding_format


def choose_rank(s: torch.Tensor, rank: Optional[int], energy: Optional[float]) -> int:
    """Smallest k reaching the energy fraction (if given), capped by ``rank`` (if given)."""
    k = s.numel()
    if energy is not None:
        power = s.double() ** 2
        total = float(power.sum())
        if total > 0:
            cumulative = torch.cumsum(power, 0) / total
            # 1e-12 slack: a fraction met up to rounding counts as met
            k = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1
    if rank is not None:
        k = min(k, rank)
    return max(1, min(k, s.numel()))


def lowrank_factors(delta: torch.Tensor, rank: Optional[int], energy: Optional[float],
                    svd: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> tuple[LowRankDelta, float]:
    """``delta``'s truncated SVD as LoRA factors (B = U√S, A = √S Vh) and the relative Frobenius error left out.
    ``svd``: ``delta``'s thin SVD when the caller already has it (several ranks of one matrix)."""
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    U, S, Vh = svd if svd is not None else torch.linalg.svd(delta.to(work), full_matrices=False)
    k = choose_rank(S, rank, energy)
    root = S[:k].sqrt()
    B = (U[:, :k] * root).contiguous()
    A = (root[:, None] * Vh[:k]).contiguous()
    total = float((S.double() ** 2).sum())
    error = (float((S[k:].double() ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
    return LowRankDelta(A, B), error


def table_factors(delta: torch.Tensor, rank: Optional[int], energy: Optional[float]) -> tuple[LowRankDelta, float]:
    """An embedding table's delta (vocab, dim) as PEFT's LoRA-embedding factors: the truncated SVD of ``deltaᵀ``,
    ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r), with ``(B A)ᵀ`` the delta's best rank-``k``
    approximation (``transpose=True``); the same rank rule and error as ``lowrank_factors``."""
    factors, error = lowrank_factors(delta.T, rank, energy)
    return LowRankDelta(factors.A, factors.B, transpose=True), error


def extract_lora(
    finetuned: str, base: str, out: Path, *, rank: Optional[int] = None, energy: Optional[float] = None,
    non_linear: Literal["save", "skip"] = "save", embeddings: Optional[str] = None, task_type: Optional[str] = None,
    overwrite: bool = False, progress: Optional[Progress] = None,
) -> DeltaResult:
    if rank is None and energy is None:
        raise DeltawiseError("LoRA extraction needs --rank, --energy, or both")
    if rank is not None and rank < 1:
        raise DeltawiseError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise DeltawiseError(f"--energy is a fraction in (0, 1], got {energy}")
    lora_tables = check_embedding_format(embeddings) == "lora"
    pair = open_pair(finetuned, base)
    out = Path(out)
    check_output_folder(out, [(base, f) for f in pair.base.input_folders()]
                        + [(finetuned, f) for f in pair.finetuned.input_folders()], overwrite)
    architectures = (pair.base.config or {}).get("architectures") or []
    if task_type is None and any(a.endswith("ForCausalLM") for a in architectures):
        task_type = "CAUSAL_LM"
    roles = architecture_for(pair.base.config)
    lowrank: dict[str, LowRankDelta] = {}
    changed: dict[str, torch.Tensor] = {}  # deltas of the other changed tensors (placed by lora_layout)
    rows: dict[str, TensorRow] = {}
    warnings: list[str] = pair.missing_warning()
    total, done = sum(pair.finetuned.info(n).nbytes for n in pair.names), 0
    for name, b, ft in pair.tensors():
        done += pair.finetuned.info(name).nbytes
        tick(progress, "extracting LoRA", done, total)
        work = torch.float64 if ft.dtype == torch.float64 else torch.float32
        delta = ft.to(work) - b.to(work)
        if not bool(delta.any()):
            continue
        dense_bytes = b.numel() * b.element_size()
        if lora_tables and roles.is_indexed_table(name, tuple(b.shape)):
            d, error = table_factors(delta, rank, energy)
            lowrank[name] = d
            rows[name] = TensorRow(name, "lowrank", dense_bytes, d.nbytes, error, {"rank": d.rank, "embedding": True})
        elif roles.is_linear_weight(name, tuple(b.shape)):
            d, error = lowrank_factors(delta, rank, energy)
            lowrank[name] = d
            rows[name] = TensorRow(name, "lowrank", dense_bytes, d.nbytes, error, {"rank": d.rank})
        elif non_linear == "save":
            changed[name] = delta
            rows[name] = TensorRow(name, "modules_to_save", dense_bytes, dense_bytes, 0.0)
        else:
            warnings.append(f"{name} changed but is not a linear weight; skipped (pass --non-linear save to keep it)")
    if not lowrank and not changed:
        raise DeltawiseError(f"{finetuned} does not differ from {base} in any floating tensor: nothing to extract")
    factor_dtype = torch.float64 if any(d.A.dtype == torch.float64 for d in lowrank.values()) else torch.float32
    layout = lora_layout(lowrank, changed, pair.base, roles, factor_dtype,
                         lambda name, _delta: pair.finetuned.get(name))  # whole: the fine-tuned value, exactly
    warnings += layout.warnings
    for name, how in layout.how.items():
        row = rows[name]
        if how == "full":
            rows[name] = TensorRow(name, "modules_to_save", row.dense_bytes, row.dense_bytes, 0.0)
            continue
        stored = layout.bias.get(name, layout.bias_values.get(name))
        weight = f"{name.rsplit('.', 1)[0]}.weight"
        zero_factors = layout.lowrank[weight].nbytes if weight not in lowrank else 0  # carry a bias alone
        rows[name] = TensorRow(name, "bias", row.dense_bytes, stored.numel() * stored.element_size() + zero_factors, 0.0,
                               {"as": "lora_B.bias" if name in layout.bias else "base_layer.bias"})
    heads, head_warnings = tied_heads(layout.whole, layout.lowrank, pair.base, roles)
    warnings += head_warnings
    for head, alias in roles.unstored_tied_heads(pair.base).items():
        if head in heads:
            size = heads[head].numel() * heads[head].element_size()
            rows[head] = TensorRow(head, "modules_to_save", size, size, 0.0, {"tied_to": alias})
    full = {**layout.whole, **heads}
    sidecar = {"format": "deltawise-peft", "method": "lora-svd",
               "parameters": {"rank": rank, "energy": energy, "non_linear": non_linear,
                              "embeddings": "lora" if lora_tables else "whole"},
               "base": base_identity(pair.base), "finetuned": {"label": finetuned, "fingerprint": pair.finetuned.fingerprint()}}
    with staged_output(out, overwrite) as staging:
        write_peft_adapter(staging, layout.lowrank, full, base_ref=sidecar["base"]["ref"], task_type=task_type,
                           sidecar=sidecar, bias=layout.bias, bias_values=layout.bias_values)
    ranks = [d.rank for n, d in layout.lowrank.items() if n in lowrank]
    summary = {"lora_tensors": len(ranks), "lora_embedding_tables": sum(d.transpose for d in layout.lowrank.values()),
               "lora_biases": len(layout.bias) + len(layout.bias_values), "modules_to_save": len(full),
               "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0)}
    return DeltaResult(out, list(rows.values()), warnings, summary)
