"""Merge in-memory state dicts with the same method code the streaming engine runs.

``merge_state_dicts`` is the in-memory counterpart of ``deltawise merge`` (and of mergekit 0.1.5's
``mergekit.merge_methods.api.merge_state_dicts``, whose call it follows): the inputs are state dicts
or modules instead of checkpoint folders, and the result is a state dict instead of a written
model. Everything between is shared with the engine: the method's parameters are validated by
its ``Param`` declarations, ``check`` sees a ``MergePlan`` of the tensors, whole-model statistics
passes (TIES/Breadcrumbs/PCB with ``granularity: global``) and per-tensor passes run over the
tensors, and ``merge`` receives a ``TensorJob`` -- each tensor as one whole chunk, which the
engine's row chunks reproduce (random methods draw per fixed row block, so DARE's masks match
too). Inputs are computed in float32 (float64 if any input is float64), as in the engine.

Not available here: methods that read files beside the weights or prepare state on disk
(fisher, regmean, opcm, the continual baselines, weight_matching), and recipe-level features
(depth gradients and ``filter`` rules, tied-embedding aliases, vocabulary cuts): use a recipe.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Optional, Union

import torch

from deltawise.errors import DeltawiseError, RecipeError, bullet_list
from deltawise.io.writer import OutputTensor
from deltawise.merge.base import REGISTRY, MergeMethod, TensorJob, merge_tensor
from deltawise.merge.loader import all_finite
from deltawise.merge.params import REQUIRED, Param, ParamError
from deltawise.merge.plan import InputModel, MergePlan, TensorPlan
from deltawise.merge.recipe import ModelEntry, Recipe

StateDict = Mapping[str, torch.Tensor]
StateDictLike = Union[StateDict, torch.nn.Module]


def merge_state_dicts(
    models: Union[Mapping[Hashable, StateDictLike], Sequence[StateDictLike]],
    method: Union[str, MergeMethod],
    *,
    parameters: Optional[Mapping[str, Any]] = None,
    base: Optional[Hashable] = None,
    strict: bool = True,
    dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge state dicts (or modules) tensor by tensor; returns the merged state dict.

    ``models``: a mapping id -> state dict, or a sequence (ids 0, 1, ...). ``base``: the id of the
    base model, one of ``models`` (the base_model of a recipe). ``parameters``: the method's
    parameters; a per-model one is a scalar for every model, a sequence in the order of the
    models the method combines (those besides the base, or all of them for methods such as
    linear that average the base in), or a mapping keyed by model id. ``strict``: every state
    dict must have the same tensor names (else only the common ones are merged). ``dtype`` /
    ``out_dtype``: the output dtype (default: the template's, i.e. the base's or the first
    model's, per tensor). Non-floating tensors (integer buffers) are copied when every input
    holds the same values, and refused otherwise. ``seed`` drives the random methods (DARE)."""
    impl = REGISTRY[method]() if isinstance(method, str) and method in REGISTRY else method
    if not isinstance(impl, MergeMethod):
        raise RecipeError(f"unknown merge method {method!r}; available: {', '.join(sorted(REGISTRY))}")
    if type(impl).prepare is not MergeMethod.prepare or type(impl).side_inputs is not MergeMethod.side_inputs:
        raise RecipeError(f"{impl.name} reads statistics files or prepares state on disk; run it from a recipe")
    items = list(models.items()) if isinstance(models, Mapping) else list(enumerate(models))
    states = {key: _as_state_dict(model) for key, model in items}
    if len(states) != len(items):
        raise RecipeError("model ids must be distinct")
    if base is not None and base not in states:
        raise RecipeError(f"base {base!r} is not one of the models ({', '.join(map(repr, states))})")
    ids = [key for key, _ in items]
    names = _tensor_names([states[key] for key in ids], strict)

    if impl.base_policy == "required" and base is None:
        raise RecipeError(f"{impl.name} needs a base (task vectors are taken relative to it)")
    base_used = base if impl.base_policy != "input" else None
    input_ids = [key for key in ids if key != base_used]
    if len(input_ids) < impl.min_models or (impl.max_models is not None and len(input_ids) > impl.max_models):
        most = "" if impl.max_models is None else f" and at most {impl.max_models}"
        raise RecipeError(f"{impl.name} takes at least {impl.min_models}{most} model(s) besides the base, got {len(input_ids)}")

    global_params, model_params = _resolve(impl, parameters or {}, input_ids)
    template = base if base is not None else input_ids[0]
    plan = _plan(impl, ids, input_ids, base_used, template, states, names, global_params, model_params, seed, dtype, out_dtype)
    problems = impl.check(plan)
    if problems:
        raise RecipeError(f"{impl.name} cannot merge these state dicts:\n{bullet_list(problems)}")

    def job(t: TensorPlan) -> TensorJob:
        compute = _compute_dtype([states[key][t.name] for key in input_ids])
        base_tensor = states[base_used][t.name].to(compute) if base_used is not None else None
        inputs = [states[key][t.name].to(compute) for key in input_ids]
        return TensorJob(t.name, base_tensor, inputs, t.params, t.model_params, {}, seed)

    stats: dict[str, Any] = {}
    for stats_pass in impl.stats_passes(plan, stats):  # whole-model statistics, as run_stats does
        for t in plan.merged:
            stats_pass.update(job(t))
    out: dict[str, torch.Tensor] = {}
    for t in plan.tensors:
        if not t.merge:
            out[t.name] = _agreed_buffer([states[key][t.name] for key in ids], t.name)
            continue
        j = job(t)
        result = merge_tensor(impl, j.base, j.models, t.params, t.model_params, name=t.name, seed=seed, stats=stats)
        result = result.to(t.out.dtype)
        if not all_finite(result):
            raise DeltawiseError(f"{impl.name} produced NaN/inf for {t.name} (output dtype {t.out.dtype})")
        out[t.name] = result
    return out


def _as_state_dict(model: StateDictLike) -> StateDict:
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if not isinstance(model, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise RecipeError(f"expected a module or a state dict of tensors by name, got {type(model).__name__}")
    return model


def _tensor_names(states: list[StateDict], strict: bool) -> list[str]:
    keys = [set(s) for s in states]
    if strict and any(k != keys[0] for k in keys[1:]):
        union = set.union(*keys)
        missing = {i: sorted(union - k)[:5] for i, k in enumerate(keys) if k != union}
        raise RecipeError(f"the state dicts hold different tensor names (first missing ones by model: {missing}); "
                          "pass strict=False to merge the common ones")
    return [name for name in states[0] if all(name in k for k in keys)]


def _resolve(impl: MergeMethod, given: Mapping[str, Any], input_ids: list[Hashable]) -> tuple[dict, list[dict]]:
    """Validated global values and per-model values (in ``input_ids`` order), defaults filled."""
    specs = {p.name: p for p in impl.params}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise RecipeError(f"{impl.name} has no parameter {', '.join(map(repr, unknown))}; it takes: {', '.join(specs) or 'none'}")
    problems: list[str] = []
    global_params: dict[str, Any] = {}
    model_params: list[dict[str, Any]] = [{} for _ in input_ids]
    for spec in impl.params:
        try:
            if spec.scope == "global":
                global_params[spec.name] = _value(spec, given.get(spec.name, spec.default))
                continue
            for i, value in enumerate(_per_model(spec, given.get(spec.name, spec.default), input_ids)):
                model_params[i][spec.name] = _value(spec, value)
        except ParamError as exc:
            problems.append(str(exc))
    if problems:
        raise RecipeError(f"{impl.name}:\n{bullet_list(problems)}")
    return global_params, model_params


def _per_model(spec: Param, value: Any, input_ids: list[Hashable]) -> list[Any]:
    if isinstance(value, Mapping):
        missing = [key for key in input_ids if key not in value]
        if missing:
            raise ParamError(f"{spec.name} has no value for model(s) {missing}")
        return [value[key] for key in input_ids]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(input_ids):
            raise ParamError(f"{spec.name} has {len(value)} values for {len(input_ids)} models")
        return list(value)
    return [value] * len(input_ids)


def _value(spec: Param, value: Any) -> Any:
    if value is REQUIRED:
        raise ParamError(f"missing required parameter {spec.name!r}: {spec.help}")
    return spec.coerce(value)


def _plan(
    impl, ids, input_ids, base_used, template, states, names, global_params, model_params, seed, dtype, out_dtype,
) -> MergePlan:
    """A MergePlan of the in-memory tensors, for the method's ``check`` and ``stats_passes``."""
    entries = {key: InputModel(str(key), reader=None) for key in ids}
    recipe = Recipe(
        merge_method=impl.name, models=[ModelEntry(model=str(key)) for key in ids],
        base_model=None if base_used is None else str(base_used), seed=seed,
    )
    tensors = []
    for name in names:
        like = states[template][name]
        floating = like.is_floating_point()
        out = OutputTensor(name, tuple(like.shape), (out_dtype or dtype or like.dtype) if floating else like.dtype)
        tensor = TensorPlan(name, out, merge=floating)
        if floating:
            tensor.params, tensor.model_params = dict(global_params), [dict(p) for p in model_params]
            _check_shapes([states[key][name] for key in ids], name)
        tensors.append(tensor)
    base_model = entries[base_used] if base_used is not None else None
    return MergePlan(recipe, impl, base_model, [entries[key] for key in input_ids], entries[template], tensors, [])


def _check_shapes(tensors: list[torch.Tensor], name: str) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise RecipeError(f"{name} has different shapes in the state dicts: {sorted(shapes)}")


def _compute_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _agreed_buffer(tensors: list[torch.Tensor], name: str) -> torch.Tensor:
    first = tensors[0]
    if any(t.dtype != first.dtype or not torch.equal(t, first) for t in tensors[1:]):
        raise RecipeError(f"non-floating tensor {name!r} differs between the state dicts; make them agree before merging")
    return first.clone()
