"""The inputs of an adapter-output merge: what each contributes to a tensor, and their one base.

An adapter is a change of one base model, so every input must be an adapter or delta of that base
(``DeltaReader``), the base itself, or -- when the recipe names ``base_model`` -- a full model, whose
change is ``model − base``. Adapters whose recorded bases differ (by fingerprint where recorded, else
by the reference) are refused, as is a full model input without ``base_model``.

``linear_coefficients`` is the algebra that makes linear and task arithmetic exact on LoRA factors:
both are ``base + Σ_i c_i Δ_i`` per tensor (docs/merging.md, "Adapter output").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from deltawise.delta.base import TensorDelta
from deltawise.errors import RecipeError, bullet_list
from deltawise.io.reader import ModelReader
from deltawise.merge.base import MergeMethod
from deltawise.merge.plan import InputModel, MergePlan, TensorPlan


def is_delta_reader(reader) -> bool:
    return hasattr(reader, "delta_rows")


@dataclass
class AdapterInputs:
    """The plan's inputs seen as changes of ``base``: per input, "zero" (the base itself), "delta" (an
    adapter or delta folder of the base) or "model" (a full model: its change is model − base)."""

    plan: MergePlan
    base: ModelReader
    base_ref: Optional[str]
    kinds: dict[int, str]  # id(InputModel) -> kind

    def kind(self, m: InputModel) -> str:
        return self.kinds[id(m)]

    def changes(self, m: InputModel, source: str) -> bool:
        kind = self.kind(m)
        return kind == "model" or (kind == "delta" and m.reader.changes(source))

    def tensor_delta(self, m: InputModel, source: str) -> Optional[TensorDelta]:
        """The delta's own form (LoRA factors, ...) of an adapter input; None for the others."""
        if self.kind(m) != "delta" or not m.reader.changes(source):
            return None
        return m.reader.tensor_delta(source)

    def dense(self, m: InputModel, source: str, name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``Δ`` of input ``m`` for the output tensor ``name`` (``source``: its name in ``m``), None where zero."""
        kind = self.kind(m)
        if kind == "zero":
            return None
        if kind == "delta":
            rows = self.base.info(name).shape[0] if self.base.info(name).shape else 1
            tau = m.reader.delta_rows(source, 0, rows)
            return None if tau is None else tau.to(dtype)
        return m.reader.get(source).to(dtype) - self.base.get(name).to(dtype)


def adapter_inputs(plan: MergePlan) -> AdapterInputs:
    """Check that the plan can be written as an adapter; raise RecipeError listing every problem."""
    problems: list[str] = []
    method = plan.method
    if plan.layout is not None:
        problems.append("a slices:/modules: recipe changes the layer stack, which an adapter cannot do")
    if plan.side_inputs or type(method).prepare is not MergeMethod.prepare:
        problems.append(f"{method.name} reads statistics files or prepares state on disk; adapter output takes methods "
                        "that merge tensor by tensor from the models alone")
    if problems:
        raise RecipeError("the merge cannot be written as an adapter:\n" + bullet_list(problems))
    deltas = [m for m in plan.inputs if is_delta_reader(m.reader)]
    if plan.base is not None and is_delta_reader(plan.base.reader):
        problems.append(f"base_model {plan.base.ref} is itself an adapter or delta; name the model it changes")
    base = plan.base.reader if plan.base is not None else (deltas[0].reader.base if deltas else None)
    if base is None:
        raise RecipeError("the merge cannot be written as an adapter:\n" + bullet_list(
            problems + [f"{m.ref} is a full model and the recipe has no base_model: an adapter changes one base model; "
                        "give base_model (then a full model's change is model - base)" for m in plan.inputs]))
    base_print = base.fingerprint()
    kinds: dict[int, str] = {}
    for m in plan.inputs:
        if plan.base is not None and m is plan.base:
            kinds[id(m)] = "zero"
        elif is_delta_reader(m.reader):
            kinds[id(m)] = "delta"
            if m.reader.base.fingerprint() != base_print:
                problems.append(f"{m.ref} is an adapter of {m.reader.base.label}, not of {base.label}: adapters of "
                                "different bases cannot make one adapter")
            if (m.reader.source.header.get("parameters") or {}).get("fan_in_fan_out"):
                problems.append(f"{m.ref}: fan_in_fan_out (Conv1D) layers are not written as adapters")
        elif plan.base is None:
            problems.append(f"{m.ref} is a full model and the recipe has no base_model: an adapter changes one base model; "
                            "give base_model (then a full model's change is model - base)")
        else:
            kinds[id(m)] = "zero" if m.reader.fingerprint() == base_print else "model"
    problems.extend(_recorded_base_problems(deltas))
    if problems:
        raise RecipeError("the merge cannot be written as an adapter:\n" + bullet_list(problems))
    recorded = next((m.reader.source.base.get("ref") for m in deltas if m.reader.source.base.get("ref")), None)
    return AdapterInputs(plan, base, plan.base.ref if plan.base is not None else recorded, kinds)


def _recorded_identity(recorded: dict) -> Optional[str]:
    """A base as a delta recorded it: its fingerprint, else its reference (a local path resolved)."""
    if recorded.get("fingerprint"):
        return f"fingerprint {recorded['fingerprint'][:12]}"
    ref = recorded.get("ref")
    if not ref:
        return None
    return os.path.realpath(ref) if Path(ref).expanduser().exists() else str(ref)


def _recorded_base_problems(deltas: list[InputModel]) -> list[str]:
    """Adapters that record different bases were made from different models, whatever base the recipe gives them."""
    seen: dict[str, str] = {}
    for m in deltas:
        recorded = m.reader.source.base
        identity = _recorded_identity(recorded)
        if identity is None:
            continue
        # a fingerprint and a reference cannot be compared: compare like with like
        key = "fingerprint" if identity.startswith("fingerprint ") else "ref"
        seen.setdefault(key, identity)
        if seen[key] != identity:
            first = next(d.ref for d in deltas if _recorded_identity(d.reader.source.base) == seen[key])
            return [f"{first} and {m.ref} are adapters of different bases ({seen[key]} and {identity}); "
                    "adapters of different bases cannot make one adapter (if both are the same model under two "
                    "names, give the adapters one base_model_name_or_path)"]
    return []


def linear_coefficients(plan: MergePlan, t: TensorPlan) -> Optional[list[float]]:
    """``c_i`` with ``merged = base + Σ_i c_i Δ_i`` for linear and task arithmetic, None for other methods
    (and for a linear merge whose coefficients do not sum to 1: it scales the base itself)."""
    name = plan.method.name
    weights = [float(p.get("weight", 1.0)) for p in t.model_params]
    if name == "task_arithmetic":
        # as the method: weights rounded to float32, normalised only when their sum is not ~0
        weights = torch.tensor(weights, dtype=torch.float32).tolist()
        total = sum(weights)
        divisor = total if t.params.get("normalize") and abs(total) >= 1e-8 else 1.0
        return [float(t.params["lambda"]) * w / divisor for w in weights]
    if name == "linear":
        divisor = sum(weights) if t.params.get("normalize") else 1.0
        coefficients = [w / divisor for w in weights]
        return coefficients if abs(sum(coefficients) - 1.0) <= 1e-6 else None
    return None
