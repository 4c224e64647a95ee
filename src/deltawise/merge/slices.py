"""Expand a ``slices:`` or ``modules:`` recipe into its output tensors (mergekit 0.1.5's plan.py rules).

Names only: which output tensor is merged from which tensor of which source, at which depth ``t``;
``deltawise.merge.plan`` opens the models and checks shapes. The rules, as mergekit's planner:

- Slices stack: output layer ``L`` runs over the slices in order; within a slice, output layer k is
  merged from layer ``start + k`` of every source, so all sources of a slice cover equally many layers.
  Layer ranges are ``[start, end)``; overlapping ranges across slices repeat layers (a frankenmerge).
- Gradients run over each slice: ``t = k / (n - 1)`` for the k-th of its n layers (1 for a one-layer slice).
- Tensors outside the layer stack are merged at ``t = 0``: embeddings from the first slice's sources,
  everything after the stack (final norm, LM head) from the last slice's sources, with that slice's
  parameters. (mergekit pairs the last slice's sources with the first slice's count; deltawise uses
  all of the last slice's sources.)
- Parameters, highest precedence first: the source's, the slice's, the module's, the recipe's.
- ``modules:`` with one module (mergekit's ``default`` for text models) is the same recipe with module
  parameters; its ``models:`` become one slice of whole models (plus base_model when not listed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from deltawise.architecture import EMBEDDING_ROLES, TensorRoles
from deltawise.merge.base import MergeMethod
from deltawise.merge.params import resolve
from deltawise.merge.recipe import OutputSlice, Recipe, SliceSource


def same_model(a: str, b: str) -> bool:
    """Two recipe references to one model (the same string, or paths to the same folder)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and os.path.realpath(pa) == os.path.realpath(pb)


@dataclass
class SlicedTensor:
    """One output tensor of a sliced recipe: the slice that merges it and its name in each source."""

    name: str
    slice_index: int
    source_names: list[str]  # one per source of the slice, in order
    t: float


@dataclass
class SliceLayout:
    slices: list[OutputSlice]
    module_parameters: dict = field(default_factory=dict)
    tensors: list[SlicedTensor] = field(default_factory=list)
    num_layers: int = 0  # of the output
    # output layer -> (model, layer) of the first source it comes from (per-layer config entries follow it)
    layer_origins: list[tuple[str, int]] = field(default_factory=list)


def module_of(recipe: Recipe) -> tuple[Optional[list[OutputSlice]], dict, list[str]]:
    """(the recipe's slices, or None for a module of whole models; module parameters; problems)."""
    if recipe.slices:
        return recipe.slices, {}, []
    if len(recipe.modules) != 1:
        return None, {}, [f"modules: {', '.join(recipe.modules)}: deltawise merges single-module (text) models only; "
                          f"give one module (mergekit names it 'default')"]
    module = next(iter(recipe.modules.values()))
    return module.slices, module.parameters, []


def source_refs(recipe: Recipe) -> list[str]:
    """Every model a sliced recipe reads, in order of first mention."""
    slices, _, _ = module_of(recipe)
    refs = [s.model for sl in (slices or []) for s in sl.sources] + [sl.base_model for sl in (slices or []) if sl.base_model]
    if slices is None and recipe.modules and len(recipe.modules) == 1:
        refs = [e.model for e in next(iter(recipe.modules.values())).models or []]
    return list(dict.fromkeys(refs))


def parameter_settings(recipe: Recipe) -> list[tuple[str, dict]]:
    """Where a sliced recipe sets parameters, labelled for messages."""
    out: list[tuple[str, dict]] = []
    for mname, module in (recipe.modules or {}).items():
        out.append((f"modules.{mname}.parameters", module.parameters))
        out += [(f"modules.{mname}.models[{i}].parameters", e.parameters) for i, e in enumerate(module.models or [])]
        out += _slice_settings(f"modules.{mname}.slices", module.slices or [])
    return out + _slice_settings("slices", recipe.slices or [])


def _slice_settings(label: str, slices: list[OutputSlice]) -> list[tuple[str, dict]]:
    out = []
    for i, sl in enumerate(slices):
        out.append((f"{label}[{i}].parameters", sl.parameters))
        out += [(f"{label}[{i}].sources[{j}].parameters", s.parameters) for j, s in enumerate(sl.sources)]
    return out


def expand(recipe: Recipe, names_of: Callable[[str], Iterable[str]],
           roles_of: Callable[[str], TensorRoles]) -> tuple[SliceLayout, list[str]]:
    """The output tensors of a sliced recipe, or the problems that stop it (every one found)."""
    slices, module_parameters, problems = module_of(recipe)
    if problems:
        return SliceLayout([]), problems
    if slices is None:  # a module of whole models: one slice over every layer, as mergekit normalises it
        entries = next(iter(recipe.modules.values())).models
        refs = [e.model for e in entries]
        sources = [SliceSource(model=e.model, layer_range=(0, _layer_count(e.model, names_of, roles_of)),
                               parameters=e.parameters) for e in entries]
        if recipe.base_model and not any(same_model(r, recipe.base_model) for r in refs):
            sources.append(SliceSource(model=recipe.base_model,
                                       layer_range=(0, _layer_count(recipe.base_model, names_of, roles_of))))
        slices = [OutputSlice(sources=sources)]
    layout = SliceLayout(slices, module_parameters)
    label = "slices" if recipe.slices else f"modules.{next(iter(recipe.modules))}.slices"
    for i, sl in enumerate(slices):
        problems += _slice_problems(f"{label}[{i}]", sl, names_of, roles_of)
    if problems:
        return layout, problems
    by_layer = {ref: _layers(names_of(ref), roles_of(ref)) for ref in dict.fromkeys(s.model for sl in slices for s in sl.sources)}
    first = slices[0].sources[0].model
    for name in names_of(first):
        if roles_of(first).layer_split(name) is None:
            pre = roles_of(first).role(name) in EMBEDDING_ROLES
            index = 0 if pre else len(slices) - 1
            layout.tensors.append(SlicedTensor(name, index, [name] * len(slices[index].sources), 0.0))
    for i, sl in enumerate(slices):
        start0, end0 = sl.sources[0].layer_range
        n = end0 - start0
        for k in range(n):
            out_layer = layout.num_layers
            layout.layer_origins.append((sl.sources[0].model, start0 + k))
            for prefix, rest in by_layer[sl.sources[0].model].get(start0 + k, []):
                names = [f"{prefix}{s.layer_range[0] + k}.{rest}" for s in sl.sources]
                layout.tensors.append(SlicedTensor(f"{prefix}{out_layer}.{rest}", i, names, k / (n - 1) if n > 1 else 1.0))
            layout.num_layers += 1
    return layout, []


def _layer_count(ref: str, names_of, roles_of) -> int:
    return roles_of(ref).num_layers(names_of(ref)) or 0


def _layers(names: Iterable[str], roles: TensorRoles) -> dict[int, list[tuple[str, str]]]:
    """Layer index -> (prefix up to the index, rest) of each tensor in that layer."""
    out: dict[int, list[tuple[str, str]]] = {}
    for name in names:
        split = roles.layer_split(name)
        if split is not None:
            block, index, rest = split
            out.setdefault(index, []).append((block[: len(block) - len(str(index))], rest))
    return out


def _slice_problems(label: str, sl: OutputSlice, names_of, roles_of) -> list[str]:
    if not sl.sources:
        return [f"{label}: 'sources' is empty; a slice lists at least one model with a layer_range"]
    problems = []
    for j, s in enumerate(sl.sources):
        start, end = s.layer_range
        count = _layer_count(s.model, names_of, roles_of)
        if start < 0 or end <= start:
            problems.append(f"{label}.sources[{j}]: layer_range [{start}, {end}] is empty or reversed; "
                            f"it is [first, end) with first < end")
        elif end > count:
            problems.append(f"{label}.sources[{j}]: layer_range [{start}, {end}] goes past the {count} layers of "
                            f"{s.model} (layers 0-{count - 1}; the end is exclusive)")
        first = next((k for k in range(j) if same_model(s.model, sl.sources[k].model)), None)
        if first is not None:
            problems.append(f"{label}.sources[{j}] ({s.model}) is the same model as sources[{first}]; "
                            f"a slice merges distinct models")
    lengths = [s.layer_range[1] - s.layer_range[0] for s in sl.sources]
    if len(set(lengths)) > 1:
        problems.append(f"{label}: the sources cover different numbers of layers ({', '.join(map(str, lengths))}); "
                        f"output layer k of a slice merges layer start+k of every source")
    return problems


def slice_groups(layout: SliceLayout, recipe: Recipe, method: MergeMethod,
                 problems: list[str]) -> list[tuple[Optional[int], list[int]]]:
    """Per slice: the position of its base among its sources (None: no base) and those of the models the
    method combines. As mergekit: a base (the slice's base_model, else the recipe's) must be one of the
    slice's sources, except for methods that take every model as an input (passthrough, linear)."""
    groups = []
    for i, sl in enumerate(layout.slices):
        base_ref, base_at = sl.base_model or recipe.base_model, None
        if base_ref is not None and method.base_policy != "input":
            base_at = next((j for j, s in enumerate(sl.sources) if same_model(s.model, base_ref)), None)
            if base_at is None:
                problems.append(f"slices[{i}]: base_model {base_ref} is not one of the slice's sources; list it there "
                                f"with a layer_range (as mergekit requires)")
        elif method.base_policy == "required":
            problems.append(f"slices[{i}]: {method.name} needs base_model, one of the slice's sources")
        members = [j for j in range(len(sl.sources)) if j != base_at]
        if not method.min_models <= len(members) <= (method.max_models or len(members)):
            problems.append(f"slices[{i}]: {method.name} takes {method.min_models} to {method.max_models or 'any number of'} "
                            f"model(s) besides the base, got {len(members)}")
        groups.append((base_at, members))
    if type(method).prepare is not MergeMethod.prepare or type(method).side_inputs is not MergeMethod.side_inputs:
        problems.append(f"{method.name} works on whole models (a search or statistics files); it cannot merge slices")
    return groups


def slice_parameters(method: MergeMethod, tensor: SlicedTensor, sl: OutputSlice, members: list[int],
                     shared: list[dict]) -> tuple[dict, list[dict]]:
    """(global, per-model) parameters of one output tensor. As mergekit, a per-model filter is matched
    against the tensor's name in that model, a global one against the output name."""
    params = {p.name: resolve(p, [sl.parameters] + shared, tensor.name, tensor.t) for p in method.params if p.scope == "global"}
    model_params = [{p.name: resolve(p, [sl.sources[j].parameters, sl.parameters] + shared, tensor.source_names[j], tensor.t)
                     for p in method.params if p.scope == "model"} for j in members]
    return params, model_params
