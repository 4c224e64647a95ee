"""Merge adapters into an adapter: ``deltawise merge RECIPE OUT --output-format adapter`` (or ``adapter:``).

When every input is an adapter or delta of one base (``adapter_inputs.py``), the merge is written
as a PEFT LoRA adapter of that base instead of a full model. Per output tensor ``W``:

- **exact** (linear and task arithmetic, every contributing input a LoRA): both methods give
  ``base + Σ_i c_i Δ_i`` with ``Δ_i = s_i B_i A_i``, so the merged delta is itself a LoRA with the
  factors concatenated, ``A = [A_1; A_2; ...]``, ``B = [c_1 s_1 B_1, c_2 s_2 B_2, ...]``, rank ``Σ r_i``,
  written at scale 1 (``lora_alpha = r`` per module, ``rank_pattern``/``alpha_pattern`` for the
  modules whose rank differs, so PEFT reloads it). No cross terms and no approximation.
- **SVD** (any other method, or an input that is not a LoRA: a DoRA, a FourierFT, a dense delta, a
  full model): the merged dense delta ``D = merged − base`` is computed as the full merge computes it
  and truncated to rank ``k`` (``--adapter-rank``, ``--adapter-energy``); the relative error
  ``‖D − D_k‖_F / ‖D‖_F`` is reported per matrix and in total (``√(Σ‖D − D_k‖²) / √(Σ‖D‖²)``).
- an embedding table (token, position or token-type ``nn.Embedding``: ``TensorRoles.is_indexed_table``) is saved
  whole by default (``embeddings: whole``); with ``embeddings: lora`` (``--adapter-embeddings lora``) it is written as
  PEFT's LoRA-embedding factors, ``(B A)ᵀ``, by the same two rules (concatenation of the inputs' LoRA-embedding
  factors, else the SVD of ``Dᵀ`` at the same rank/energy, its error in the report and the total). PEFT's LoRA on an
  embedding leaves a *tied* output head at the base value in ``PeftModel``'s forward (its ``merge_and_unload`` moves
  the head with the embedding; with ``ensure_weight_tying`` the forward is right and the merge adds the delta twice,
  PEFT 0.21): a head the model has and the base does not store is therefore saved whole, with a warning.
- a bias of a LoRA module is written as ``lora_B.bias`` (``lora_bias: true``), or, beside LoRA embeddings (PEFT has
  no ``lora_bias`` for them), as the module's new bias (``base_layer.bias``, ``bias: "lora_only"``); any other changed
  tensor (a norm, an embedding saved whole, a head) as its merged value in ``modules_to_save``.

A tensor that no input changes keeps the base value when the method maps equal inputs to
themselves, which is checked on a small probe per parameter setting; where it does not (a linear
merge whose weights do not sum to 1), the tensor is merged like the changed ones.
Memory: one whole tensor per input at a time (an SVD needs the whole matrix).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from deltawise.architecture import TensorRoles, architecture_for
from deltawise.delta.lowrank import LowRankDelta
from deltawise.delta.lora_layout import lora_layout, tied_heads
from deltawise.delta.peft_io import write_peft_adapter
from deltawise.delta.store import base_identity
from deltawise.errors import DeltawiseError, InputError, RecipeError
from deltawise.io.dtypes import parse_dtype
from deltawise.io.output import staged_output
from deltawise.merge.adapter_inputs import AdapterInputs, adapter_inputs, linear_coefficients
from deltawise.merge.base import merge_tensor
from deltawise.merge.plan import MergePlan, TensorPlan
from deltawise.merge.recipe import Recipe
from deltawise.options import check_embedding_format

REPORT_FORMAT = "deltawise-adapter-merge"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class AdapterSettings:
    rank: Optional[int] = None
    energy: Optional[float] = None
    embeddings: str = "whole"  # changed embedding tables: "whole" (modules_to_save) or "lora" (LoRA-embedding factors)

    @property
    def lora_tables(self) -> bool:
        return self.embeddings == "lora"


def adapter_settings(recipe: Recipe, output_format: Optional[str] = None, rank: Optional[int] = None,
                     energy: Optional[float] = None, embeddings: Optional[str] = None) -> Optional[AdapterSettings]:
    """The adapter output asked for by the flags and the recipe's ``adapter:`` key (None: write a model).
    The two must agree: a value given in both places must be the same."""
    check_embedding_format(embeddings)
    spec = recipe.adapter
    if output_format == "model" and spec is not None:
        raise RecipeError("the recipe asks for an adapter output (adapter:) but --output-format model was given; "
                          "drop one of them")
    if output_format != "adapter" and spec is None:
        if rank is not None or energy is not None or embeddings is not None:
            raise InputError("--adapter-rank/--adapter-energy/--adapter-embeddings shape an adapter output: add "
                             "--output-format adapter")
        return None
    return AdapterSettings(_agree("rank", rank, spec.rank if spec else None),
                           _agree("energy", energy, spec.energy if spec else None),
                           _agree("embeddings", embeddings, spec.embeddings if spec else None) or "whole")


def _agree(key: str, flag: Any, recipe: Any) -> Any:
    if flag is not None and recipe is not None and flag != recipe:
        raise RecipeError(f"--adapter-{key} {flag} disagrees with the recipe's adapter.{key}: {recipe}; drop one of them")
    return flag if flag is not None else recipe


@dataclass
class MatrixRow:
    name: str
    how: str  # "concat" (exact LoRA sum) | "svd" | "bias" (lora_B.bias / base_layer.bias) | "full" (modules_to_save)
    rank: Optional[int]
    relative_error: float
    norm: float  # ‖D‖_F of the merged delta
    embedding: bool = False  # an embedding table written as LoRA-embedding factors

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.name, "how": self.how, "rank": self.rank, "relative_error": self.relative_error,
                "delta_norm": self.norm, "lora_embedding": self.embedding}


@dataclass
class AdapterMergeResult:
    out: Path
    rows: list[MatrixRow]
    seconds: float
    settings: AdapterSettings
    warnings: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return all(r.how != "svd" for r in self.rows)

    @property
    def total_relative_error(self) -> float:
        total = sum(r.norm ** 2 for r in self.rows)
        lost = sum((r.relative_error * r.norm) ** 2 for r in self.rows)
        return math.sqrt(lost / total) if total > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        ranks = [r.rank for r in self.rows if r.rank]
        return {"exact": self.exact, "total_relative_error": self.total_relative_error,
                "max_relative_error": max((r.relative_error for r in self.rows), default=0.0),
                "lora_matrices": len(ranks), "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
                "svd_matrices": sum(r.how == "svd" for r in self.rows),
                "lora_embedding_tables": sum(r.embedding for r in self.rows),
                "modules_to_save_tensors": sum(r.how == "full" for r in self.rows)}


@dataclass
class _Parts:
    """What the adapter stores, by base tensor name."""

    lowrank: dict[str, LowRankDelta] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # bias deltas of LoRA modules
    bias_values: dict[str, torch.Tensor] = field(default_factory=dict)  # their new values, beside LoRA embeddings
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # merged deltas that are not LoRA weights
    rows: dict[str, MatrixRow] = field(default_factory=dict)


def run_adapter_merge(plan: MergePlan, out: str | Path, settings: AdapterSettings, *, overwrite: bool = False,
                      progress: Optional[Progress] = None) -> AdapterMergeResult:
    """Merge ``plan`` and write the result as a PEFT LoRA adapter folder ``out`` (atomically)."""
    from deltawise.delta.lora_extract import lowrank_factors, table_factors  # SVD here only: not on a model merge's start
    from deltawise.merge.engine import check_output

    started = time.time()
    out = Path(out)
    inputs = adapter_inputs(plan)
    check_output(plan, out, overwrite, need_bytes=0)
    roles = architecture_for(inputs.base.config)
    if settings.rank is None and settings.energy is None:
        needs_svd = svd_tensors(plan, inputs, roles, settings.lora_tables)
        if needs_svd:  # said before any tensor is merged
            listed = ", ".join(needs_svd[:5]) + (f" and {len(needs_svd) - 5} more" if len(needs_svd) > 5 else "")
            raise RecipeError(f"{plan.method.name} of these inputs is not an exact sum of LoRA factors for {listed}: give "
                              "--adapter-rank or --adapter-energy (or adapter: {rank: N} in the recipe) to write it by SVD")
    factor_dtype = _factor_dtype(plan.recipe)
    parts = _Parts()
    dense_deltas = _DenseDeltas(plan, inputs)
    total = sum(t.out.nbytes for t in plan.tensors)
    done = 0
    for t in plan.tensors:
        done += t.out.nbytes
        if progress is not None:
            progress("merging into an adapter", done, total)
        delta = _exact_lora(plan, inputs, t, settings, roles)
        if delta is not None:
            parts.lowrank[t.name], parts.rows[t.name] = delta
            continue
        dense = dense_deltas.of(t)
        if dense is None or not bool(dense.any()):
            continue
        if not bool(torch.isfinite(dense).all()):
            raise DeltawiseError(f"{plan.method.name} produced NaN/inf for {t.name}; check the parameters")
        norm = float(dense.double().norm())
        table = settings.lora_tables and roles.is_indexed_table(t.name, tuple(dense.shape))
        if table or roles.is_linear_weight(t.name, tuple(dense.shape)):
            # without a rank or energy (a tensor no input changes that the method moves): full rank
            factors, error = (table_factors if table else lowrank_factors)(dense, settings.rank, settings.energy)
            parts.lowrank[t.name] = LowRankDelta(factors.A.to(factor_dtype), factors.B.to(factor_dtype),
                                                 transpose=table)
            parts.rows[t.name] = MatrixRow(t.name, "svd", factors.rank, error, norm, table)
        else:
            parts.dense[t.name] = dense
            parts.rows[t.name] = MatrixRow(t.name, "full", None, 0.0, norm)
    warnings = list(plan.warnings)
    full = _place_other_tensors(parts, inputs, roles, factor_dtype, warnings)
    if not parts.lowrank and not full:
        raise RecipeError("the merge leaves the base unchanged: there is no adapter to write")
    result = AdapterMergeResult(out, [parts.rows[n] for n in parts.rows], time.time() - started, settings, warnings)
    sidecar = _report(plan, inputs, result)
    architectures = (inputs.base.config or {}).get("architectures") or []
    task_type = "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in architectures) else None
    with staged_output(out, overwrite) as staging:
        write_peft_adapter(staging, parts.lowrank, full, base_ref=inputs.base_ref, task_type=task_type, sidecar=sidecar,
                           bias=parts.bias, bias_values=parts.bias_values)
    result.seconds = time.time() - started
    return result


def svd_tensors(plan: MergePlan, inputs: AdapterInputs, roles: TensorRoles, lora_tables: bool = False) -> list[str]:
    """The linear weights (and with ``lora_tables`` the embedding tables) whose merge is not a sum of the inputs'
    LoRA factors (from the plan: nothing is read)."""
    names = []
    for t in plan.merged:
        table = lora_tables and roles.is_indexed_table(t.name, tuple(t.out.shape))
        if not table and not roles.is_linear_weight(t.name, tuple(t.out.shape)):
            continue
        changed = [(m, s) for m, s in zip(plan.inputs_of(t), t.sources) if inputs.changes(m, s)]
        if changed and (linear_coefficients(plan, t) is None or any(
                inputs.kind(m) != "delta" or s not in m.reader.source.entries or m.reader.source.kind(s) != "lowrank"
                or _stored_transposed(m, s) != table for m, s in changed)):
            names.append(t.name)
    return names


def _stored_transposed(model: Any, source: str) -> bool:
    """Whether an adapter input stores ``source`` as transposed LoRA factors (LoRA on an embedding, fan_in_fan_out)."""
    entry = model.reader.source.entries.get(source)  # a delta folder's header entry (a dict), or a PEFT adapter's
    return bool(entry.get("transpose") if isinstance(entry, dict) else getattr(entry, "transpose", False))


def _factor_dtype(recipe: Recipe) -> torch.dtype:
    """LoRA factors are stored in float32 unless the recipe asks for an output dtype."""
    given = recipe.out_dtype or recipe.dtype
    return parse_dtype(given) if given else torch.float32


def _exact_lora(plan: MergePlan, inputs: AdapterInputs, t: TensorPlan, settings: AdapterSettings,
                roles: TensorRoles) -> Optional[tuple[LowRankDelta, MatrixRow]]:
    """The merged delta of ``t`` as concatenated LoRA factors, when the algebra allows (module docstring)."""
    table = settings.lora_tables and roles.is_indexed_table(t.name, tuple(t.out.shape))
    if not t.merge or not (table or roles.is_linear_weight(t.name, tuple(t.out.shape))):
        return None
    coefficients = linear_coefficients(plan, t)
    if coefficients is None:
        return None
    models = plan.inputs_of(t)
    factors: list[tuple[float, LowRankDelta]] = []
    for c, m, source in zip(coefficients, models, t.sources):
        if not inputs.changes(m, source):
            continue
        d = inputs.tensor_delta(m, source)
        if not isinstance(d, LowRankDelta) or d.transpose != table:  # an embedding's LoRA factors are stored transposed
            return None
        if c != 0:
            factors.append((c * d.scale * getattr(m.reader, "scale", 1.0), d))
    if not factors:
        return None
    work = torch.float64 if any(torch.float64 in (d.A.dtype, d.B.dtype) for _, d in factors) else torch.float32
    A = torch.cat([d.A.to(work) for _, d in factors])
    B = torch.cat([c * d.B.to(work) for c, d in factors], dim=1)
    merged = LowRankDelta(A, B, transpose=table)
    norm = float(merged.materialize(work).double().norm())
    if settings.rank is not None and merged.rank > settings.rank:
        # the rank cap applies to sums too: the best rank-k approximation of the exact sum
        from deltawise.delta.lora_extract import lowrank_factors, table_factors  # SVD outputs only

        factors_k, error = (table_factors if table else lowrank_factors)(merged.materialize(work), settings.rank,
                                                                         settings.energy)
        return factors_k, MatrixRow(t.name, "svd", factors_k.rank, error, norm, table)
    dtype = _factor_dtype(plan.recipe)
    return LowRankDelta(A.to(dtype), B.to(dtype), transpose=table), MatrixRow(t.name, "concat", merged.rank, 0.0, norm,
                                                                               table)


class _DenseDeltas:
    """``merged − base`` per tensor, in float32 (float64 for float64 data), as the full merge computes it."""

    def __init__(self, plan: MergePlan, inputs: AdapterInputs):
        self.plan, self.inputs = plan, inputs
        self.probes: dict[str, bool] = {}
        self.stats: Optional[dict[str, Any]] = None  # whole-model statistics, collected on first need

    def of(self, t: TensorPlan) -> Optional[torch.Tensor]:
        """None where the tensor keeps the base value."""
        plan, inputs = self.plan, self.inputs
        work = torch.float64 if inputs.base.info(t.name).dtype == torch.float64 else torch.float32
        if not t.merge:  # copied from the template: its change, when the template is an adapter
            template = plan.template
            return inputs.dense(template, t.name, t.name, work) if inputs.kind(template) == "delta" else None
        models = plan.inputs_of(t)
        if not any(inputs.changes(m, s) for m, s in zip(models, t.sources)) and self.keeps_base(t):
            return None
        coefficients = linear_coefficients(plan, t)
        if coefficients is not None:  # Σ c_i Δ_i from each delta's own form: no rounding through base + Δ
            total = torch.zeros(inputs.base.info(t.name).shape, dtype=work)
            for c, m, s in zip(coefficients, models, t.sources):
                d = inputs.dense(m, s, t.name, work)
                if d is not None:
                    total.add_(d, alpha=c)
            return total
        return self.method_delta(t, work)

    def keeps_base(self, t: TensorPlan) -> bool:
        """Whether the method maps inputs that all equal the base to the base, for ``t``'s parameters (a probe)."""
        key = repr((t.params, t.model_params))
        if key not in self.probes:
            plan = self.plan
            base = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
            uses_base = plan.base_of(t) is not None
            try:
                result = merge_tensor(plan.method, base.clone() if uses_base else None,
                                      [base.clone() for _ in plan.inputs_of(t)], t.params, t.model_params, name=t.name,
                                      seed=plan.recipe.seed)
                self.probes[key] = bool(torch.allclose(result, base, rtol=1e-5, atol=1e-6))
            except Exception:  # a method that cannot run on the probe alone (whole-model statistics): merge the tensor
                self.probes[key] = False
        return self.probes[key]

    def method_delta(self, t: TensorPlan, work: torch.dtype) -> torch.Tensor:
        """The method run on the whole tensor as the engine runs it (exact deltas of adapter inputs), minus the base."""
        from concurrent.futures import ThreadPoolExecutor

        from deltawise.merge.engine import MergeOptions, run_stats
        from deltawise.merge.loader import ChunkLoader

        plan = self.plan
        loader = ChunkLoader(plan, torch.device("cpu"))
        if self.stats is None:  # the engine's whole-model passes (global top-k thresholds); none for most methods
            with ThreadPoolExecutor(max_workers=1) as pool:
                self.stats = run_stats(plan, MergeOptions(threads=1), loader, pool)
        rows = t.out.shape[0] if t.out.shape else 1
        job = loader.job(t, 0, rows, dict(self.stats), plan.recipe.seed)
        for stats_pass in plan.method.tensor_passes(t.params, t.model_params, t.out_numel, job.stats):
            stats_pass.update(job)
        merged = plan.method.merge(job).to(work)
        return merged - self.inputs.base.get(t.name).to(work)


def _place_other_tensors(parts: _Parts, inputs: AdapterInputs, roles: TensorRoles, dtype: torch.dtype,
                         warnings: list[str]) -> dict[str, torch.Tensor]:
    """The changed tensors that are not LoRA factors placed by ``lora_layout`` (biases of LoRA modules as
    ``lora_B.bias``, or ``base_layer.bias`` beside LoRA embeddings; the rest saved whole, as ``base + merged delta``
    in the base dtype), and the tied heads; returns the tensors saved whole (``modules_to_save``)."""
    base = inputs.base

    def new_value(name: str, delta: torch.Tensor) -> torch.Tensor:
        value = base.get(name)
        return (value.to(delta.dtype) + delta).to(value.dtype)

    layout = lora_layout(parts.lowrank, parts.dense, base, roles, dtype, new_value)
    warnings += layout.warnings
    parts.lowrank, parts.bias, parts.bias_values = layout.lowrank, layout.bias, layout.bias_values
    for name, how in layout.how.items():
        # a weight cut by SVD and then saved whole with its module keeps the cut (the exact merged delta is gone by
        # now), so it keeps its error too
        error = parts.rows[name].relative_error if parts.rows[name].how == "svd" else 0.0
        parts.rows[name] = MatrixRow(name, how, None, error, parts.rows[name].norm)
    heads, head_warnings = tied_heads(layout.whole, parts.lowrank, inputs.base, roles)
    warnings += head_warnings
    return {**layout.whole, **heads}


def _report(plan: MergePlan, inputs: AdapterInputs, result: AdapterMergeResult) -> dict[str, Any]:
    """The ``deltawise.json`` sidecar: how each tensor was written, with its error, and the totals."""
    return {
        "format": "deltawise-peft", "method": "merge", "report_format": REPORT_FORMAT,
        "merge_method": plan.method.name,
        "exactness": "exact" if result.exact else "svd",
        "adapter": {"rank": result.settings.rank, "energy": result.settings.energy,
                    "embeddings": result.settings.embeddings},
        "recipe": plan.recipe.model_dump(mode="json", exclude_none=True),
        "inputs": [{"model": r.label, "fingerprint": r.fingerprint()} for r in plan.readers],
        "base": base_identity(inputs.base),
        **result.summary(),
        "tensors": [r.to_json() for r in result.rows],
        "warnings": result.warnings,
    }


def describe(result: AdapterMergeResult, worst: int = 5) -> list[str]:
    """Lines for the terminal: how the adapter was made, its errors, the worst matrices."""
    s = result.summary()
    tables = f", {s['lora_embedding_tables']} of them embedding tables" if s["lora_embedding_tables"] else ""
    lines = [f"{s['lora_matrices']} LoRA matrices (rank {s['rank_min']}-{s['rank_max']}{tables}), "
             f"{s['modules_to_save_tensors']} tensor(s) saved whole; "
             + ("exact: every matrix is a sum of the inputs' LoRA factors" if result.exact else
                f"{s['svd_matrices']} matrix(es) by SVD, total relative error {s['total_relative_error']:.3g} "
                f"(largest {s['max_relative_error']:.3g})")]
    svd = sorted((r for r in result.rows if r.how == "svd"), key=lambda r: -r.relative_error)[:worst]
    lines += [f"  {r.name}: rank {r.rank}, relative error {r.relative_error:.3g}" for r in svd]
    return lines
