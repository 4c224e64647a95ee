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
- Several modules (a vision-language model: ``deltawise.architecture.modules_for``, the stacks mergekit
  infers from the tensor names): one module per layer stack, each stacked on its own by the rules above
  with its own slices and parameters, and ``default`` holding every tensor outside the stacks, merged at
  ``t = 0`` from its first slice's sources (mergekit's inferred modules put them all before the layers).
  Every module of the model is listed (else the output would lack tensors); ``default`` has no layers, so
  its ranges are ``[0, 0]``. Each stack's output layer count goes to its config key
  (``text_config.num_hidden_layers``); a stack whose key was not found may keep its depth, not change it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from deltawise.architecture import (DEFAULT_MODULE, EMBEDDING_ROLES, FileModule, FileModules, LayerStack, ModelModules,
                                    TensorRoles, architecture_name, config_value, file_count_key, file_modules_for,
                                    infer_stacks, modules_for)
from deltawise.merge.base import MergeMethod
from deltawise.merge.params import resolve
from deltawise.merge.recipe import OutputModule, OutputSlice, Recipe, SliceSource

Split = Callable[[str], Optional[tuple[str, int, str]]]  # tensor name -> (layer path prefix, index, rest)


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
class ModuleLayout:
    """One module of the output: its own layer stack, parameters and slices."""

    name: str  # as the recipe names it ("" for a plain ``slices:`` recipe)
    parameters: dict = field(default_factory=dict)
    count_key: Optional[str] = None  # dotted config key of its output layer count; None: it has no layers
    stack: Optional[LayerStack] = None  # a stack of a multi-module model; None: the model's own layers
    num_layers: int = 0  # of the output
    # output layer -> (model, layer) of the first source it comes from (per-layer config entries follow it)
    layer_origins: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class SliceLayout:
    slices: list[OutputSlice]  # every module's, in order
    labels: list[str] = field(default_factory=list)  # per slice, for messages: "modules.default.slices[0]"
    slice_modules: list[int] = field(default_factory=list)  # per slice, the index of its module
    modules: list[ModuleLayout] = field(default_factory=list)
    tensors: list[SlicedTensor] = field(default_factory=list)

    def module_of(self, slice_index: int) -> ModuleLayout:
        return self.modules[self.slice_modules[slice_index]]


def _module_entries(recipe: Recipe) -> list[tuple[str, Optional[OutputModule]]]:
    """(label, module) per module of the recipe; a plain ``slices:`` recipe is one unnamed module."""
    if recipe.slices:
        return [("", None)]
    return list((recipe.modules or {}).items())


def source_refs(recipe: Recipe) -> list[str]:
    """Every model a sliced recipe reads, in order of first mention."""
    refs: list[str] = []
    for _, module in _module_entries(recipe):
        slices = recipe.slices if module is None else module.slices
        if slices:
            refs += [s.model for sl in slices for s in sl.sources] + [sl.base_model for sl in slices if sl.base_model]
        else:
            refs += [e.model for e in module.models or []]
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


def expand(recipe: Recipe, names_of: Callable[[str], Iterable[str]], roles_of: Callable[[str], TensorRoles],
           config_of: Callable[[str], Optional[dict]] = lambda ref: None) -> tuple[SliceLayout, list[str]]:
    """The output tensors of a sliced recipe, or the problems that stop it (every one found)."""
    refs = source_refs(recipe)
    template = recipe.base_model or (refs[0] if refs else None)
    table = modules_for(config_of(template), names_of(template)) if template else None
    files = file_modules_for(config_of(template), names_of(template)) if template else None
    if files is not None and not any(name in files.names for name in recipe.modules or {}):
        files = None  # the recipe names the inferred modules
    if files is not None:
        problems = _file_module_problems(recipe, files, template, refs, config_of, names_of)
    else:
        problems = _module_problems(recipe, table, template, refs, config_of, names_of) if template else []
    if problems:
        return SliceLayout([]), problems
    layout = SliceLayout([])
    for label, module in _module_entries(recipe):
        stack = table.stack(label) if table is not None else None
        file_module = files.module(label) if files is not None else None
        if file_module is not None:  # a module of mergekit's architecture file
            stack = file_module.stack
            key = file_count_key(stack, config_of(template)) if stack and stack.count_key else None
            out = ModuleLayout(label, module.parameters, key, stack)
            split_of = _stack_split(stack)
            count_of = _stack_count(stack, names_of, config_of) if stack else (lambda ref, n=file_module.layers: n)
        elif table is None:  # the model's one layer stack, split by its architecture's rules
            config = (config_of(template) if template else None) or {}
            key = "n_layer" if "n_layer" in config and "num_hidden_layers" not in config else "num_hidden_layers"
            out = ModuleLayout(label, module.parameters if module else {}, key)
            split_of = _roles_split(roles_of)
            count_of = _roles_count(roles_of, names_of)
        else:
            out = ModuleLayout(label, module.parameters, stack.count_key if stack else None, stack)
            split_of, count_of = _stack_split(stack), _stack_count(stack, names_of, config_of)
        slices = recipe.slices if module is None else module.slices
        if slices is None:  # a module of whole models: one slice over every layer, as mergekit normalises it
            slices = [_whole_models(module, recipe.base_model, count_of)]
        prefix = "slices" if module is None else f"modules.{label}.slices"
        found = [p for i, sl in enumerate(slices) for p in _slice_problems(f"{prefix}[{i}]", sl, count_of)]
        if stack is not None:
            found += _layout_problems(f"modules.{label}", stack, [s.model for sl in slices for s in sl.sources], names_of)
        if found:
            problems += found
            continue
        first = len(layout.slices)
        layout.modules.append(out)
        layout.slices += slices
        layout.labels += [f"{prefix}[{i}]" for i in range(len(slices))]
        layout.slice_modules += [len(layout.modules) - 1] * len(slices)
        if file_module is not None:
            _expand_file_module(layout, out, first, slices, names_of, split_of, files, file_module)
        else:
            _expand_module(layout, out, first, slices, names_of, roles_of, split_of, table)
        if stack is not None and stack.count_key is None and out.num_layers != count_of(template):
            problems.append(f"modules.{label}: the output has {out.num_layers} layers in this stack, {template} "
                            f"{count_of(template)}, but no config key can be told to hold its count "
                            f"({stack.unresolved}), so the output config would not match its tensors; "
                            f"a stack without a known count key keeps its {count_of(template)} layers")
    return layout, problems


def _module_problems(recipe: Recipe, table: Optional[ModelModules], template: str, refs: list[str],
                     config_of: Callable[[str], Optional[dict]], names_of) -> list[str]:
    """Whether the recipe's modules are the model's: one for a text model, every one for a multi-module model."""
    given = list(recipe.modules or {})
    arch = architecture_name(config_of(template))
    if table is None:
        if len(given) > 1:
            stacks = ", ".join(infer_stacks(names_of(template))) or "none"
            return [f"modules: {', '.join(given)}: {template} is {arch}, a model of one layer stack (by its tensor names, "
                    f"as mergekit infers modules: {stacks}); it is merged as a single module: give one module "
                    f"(mergekit names it 'default')"]
        return []
    files = file_modules_for(config_of(template))
    also = f" (or mergekit's {', '.join(files.names)}, from its {files.file})" if files else ""
    if files is not None and not files.fits(names_of(template)):
        also = (f" (mergekit's {', '.join(files.names)} need its tensor names in the hub's or transformers 5's layout, "
                f"which {template}'s are not)")
    if recipe.slices:
        return [f"slices: {template} is {arch}, a model of several modules ({', '.join(table.names)}){also}; "
                f"write a modules: recipe with one entry per module, as mergekit requires"]
    problems = []
    paths = [s.paths for s in table.stacks]
    for ref in refs:
        other = modules_for(config_of(ref), names_of(ref))
        if architecture_name(config_of(ref)) != arch:
            problems.append(f"{ref} is {architecture_name(config_of(ref))}, not {arch} as {template}; "
                            f"a modules: recipe merges models of one architecture")
        elif other is None or [s.paths for s in other.stacks] != paths:
            problems.append(f"{ref}: its layer stacks ({', '.join(s.name for s in other.stacks) if other else 'one'}) are "
                            f"not those of {template} ({', '.join(s.name for s in table.stacks)}); checkpoints of "
                            f"different transformers layouts: save them in one layout")
    meant = {name: (table.stack(name).name if table.stack(name) else name) for name in given}
    for name in given:
        if name != DEFAULT_MODULE and table.stack(name) is None:
            problems.append(f"modules.{name}: {arch} has no module {name!r}; its modules are {', '.join(table.names)}{also}")
    missing = [m for m in table.names if m not in meant.values()]
    if missing and not problems:
        problems.append(f"modules: {arch} has the modules {', '.join(table.names)}; the recipe lacks "
                        f"{', '.join(missing)}, whose tensors the output would not have (list each module)")
    twice = [m for m in table.names if list(meant.values()).count(m) > 1]
    problems += [f"modules: {m} is listed twice (under {' and '.join(n for n in given if meant[n] == m)})" for m in twice]
    return problems


def _file_module_problems(recipe: Recipe, files: FileModules, template: str, refs: list[str],
                          config_of: Callable[[str], Optional[dict]], names_of) -> list[str]:
    """Whether the recipe lists exactly the modules of mergekit's architecture file, on models of its architecture,
    and every tensor belongs to one of them (else the output would silently lack it)."""
    arch = architecture_name(config_of(template))
    orphans = [name for name in names_of(template) if files.module_of(name) is None]
    if orphans:
        return [f"{template}: {len(orphans)} tensor(s) ({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''}) "
                f"belong to none of the modules of mergekit's {files.file} ({', '.join(files.names)}); name the "
                f"inferred modules instead"]
    problems = [f"{ref} is {architecture_name(config_of(ref))}, not {arch} as {template}; a modules: recipe merges "
                f"models of one architecture" for ref in refs if architecture_name(config_of(ref)) != arch]
    given = list(recipe.modules or {})
    problems += [f"modules.{name}: {arch} has no module {name!r} in mergekit's {files.file}; its modules are "
                 f"{', '.join(files.names)} (a recipe names either these or the inferred ones, not both)"
                 for name in given if name not in files.names]
    missing = [m for m in files.names if m not in given]
    if missing and not problems:
        problems.append(f"modules: {arch} has the modules {', '.join(files.names)} (mergekit's {files.file}); the "
                        f"recipe lacks {', '.join(missing)}, whose tensors the output would not have (list each module)")
    return problems


def _roles_split(roles_of: Callable[[str], TensorRoles]) -> Callable[[str], Split]:
    return lambda ref: roles_of(ref).layer_split


def _roles_count(roles_of: Callable[[str], TensorRoles], names_of) -> Callable[[str], int]:
    return lambda ref: roles_of(ref).num_layers(names_of(ref)) or 0


def _stack_split(stack: Optional[LayerStack]) -> Callable[[str], Split]:
    def split(name: str) -> Optional[tuple[str, int, str]]:
        found = stack.split(name) if stack is not None else None
        return (found[0] + ".", found[1], found[2]) if found else None

    return lambda ref: split


def _layout_problems(label: str, stack: LayerStack, refs: list[str], names_of) -> list[str]:
    """Every model of a module must name the stack's layers alike (checkpoints of one transformers layout)."""
    paths = {ref: next((found[0] for found in map(stack.split, names_of(ref)) if found), None) for ref in dict.fromkeys(refs)}
    if len(set(paths.values())) <= 1:
        return []
    listed = "; ".join(f"{ref}: {path or 'none'}" for ref, path in paths.items())
    return [f"{label}: the models name this module's layers differently ({listed}); they are checkpoints of "
            f"different transformers layouts: save them in one layout (load and save_pretrained with one version)"]


def _stack_count(stack: Optional[LayerStack], names_of, config_of) -> Callable[[str], int]:
    """A model's layer count in ``stack``: its config key, else one more than the highest index (0 for default)."""
    def count(ref: str) -> int:
        if stack is None:
            return 0
        value = None if stack.layers else config_value(config_of(ref), stack.count_key)  # inferred: by names, as mergekit
        if isinstance(value, int):
            return value
        return max((found[1] + 1 for found in map(stack.split, names_of(ref)) if found), default=0)

    return count


def _whole_models(module: OutputModule, base_model: Optional[str], count_of: Callable[[str], int]) -> OutputSlice:
    sources = [SliceSource(model=e.model, layer_range=(0, count_of(e.model)), parameters=e.parameters)
               for e in module.models]
    if base_model and not any(same_model(e.model, base_model) for e in module.models):
        sources.append(SliceSource(model=base_model, layer_range=(0, count_of(base_model))))
    return OutputSlice(sources=sources)


def _expand_module(layout: SliceLayout, module: ModuleLayout, first: int, slices: list[OutputSlice],
                   names_of, roles_of, split_of: Callable[[str], Split], table: Optional[ModelModules],
                   layers_only: bool = False) -> None:
    """Append the output tensors of one module (its slices are ``layout.slices[first:]``)."""
    by_layer = {ref: _layers(names_of(ref), split_of(ref)) for ref in dict.fromkeys(s.model for sl in slices for s in sl.sources)}
    lead = slices[0].sources[0].model
    if layers_only:
        pass
    elif table is None:  # embeddings from the first slice, the rest after the stack from the last
        for name in names_of(lead):
            if roles_of(lead).layer_split(name) is None:
                index = 0 if roles_of(lead).role(name) in EMBEDDING_ROLES else len(slices) - 1
                layout.tensors.append(SlicedTensor(name, first + index, [name] * len(slices[index].sources), 0.0))
    elif module.stack is None:  # default: every tensor outside the stacks, from its first slice
        for name in names_of(lead):
            if not any(stack.split(name) for stack in table.stacks):
                layout.tensors.append(SlicedTensor(name, first, [name] * len(slices[0].sources), 0.0))
    for i, sl in enumerate(slices):
        start0, end0 = sl.sources[0].layer_range
        n = end0 - start0
        for k in range(n):
            out_layer = module.num_layers
            module.layer_origins.append((sl.sources[0].model, start0 + k))
            for prefix, rest in by_layer[sl.sources[0].model].get(start0 + k, []):
                names = [f"{prefix}{s.layer_range[0] + k}.{rest}" for s in sl.sources]
                layout.tensors.append(SlicedTensor(f"{prefix}{out_layer}.{rest}", first + i, names,
                                                   k / (n - 1) if n > 1 else 1.0))
            module.num_layers += 1


def _expand_file_module(layout: SliceLayout, module: ModuleLayout, first: int, slices: list[OutputSlice], names_of,
                        split_of: Callable[[str], Split], files: FileModules, owner: FileModule) -> None:
    """Append the output tensors of one module of mergekit's architecture file: its tensors outside its layers from
    the first slice (pre_weights) or the last (post_weights, at t = 0; index-free layer templates at t = 1)."""
    lead, last = slices[0].sources[0].model, len(slices) - 1
    before, after = [], []
    for name in names_of(lead):
        if files.module_of(name) is not owner or split_of(lead)(name) is not None:
            continue
        if owner.repeated and re.fullmatch(owner.repeated, name):
            after.append(SlicedTensor(name, first + last, [name] * len(slices[last].sources), 1.0))
        elif owner.post and re.fullmatch(owner.post, name):
            after.append(SlicedTensor(name, first + last, [name] * len(slices[last].sources), 0.0))
        else:
            before.append(SlicedTensor(name, first, [name] * len(slices[0].sources), 0.0))
    layout.tensors += before
    _expand_module(layout, module, first, slices, names_of, None, split_of, None, layers_only=True)
    layout.tensors += after


def _layers(names: Iterable[str], split: Split) -> dict[int, list[tuple[str, str]]]:
    """Layer index -> (prefix up to the index, rest) of each tensor in that layer."""
    out: dict[int, list[tuple[str, str]]] = {}
    for name in names:
        found = split(name)
        if found is not None:
            block, index, rest = found
            prefix = block if block.endswith(".") else block[: len(block) - len(str(index))]
            out.setdefault(index, []).append((prefix, rest))
    return out


def _slice_problems(label: str, sl: OutputSlice, count_of: Callable[[str], int]) -> list[str]:
    if not sl.sources:
        return [f"{label}: 'sources' is empty; a slice lists at least one model with a layer_range"]
    problems = []
    for j, s in enumerate(sl.sources):
        start, end = s.layer_range
        count = count_of(s.model)
        if count == 0 and (start, end) != (0, 0):
            problems.append(f"{label}.sources[{j}]: layer_range [{start}, {end}], but this module holds no layers "
                            f"(the tensors outside the layer stacks); its layer_range is [0, 0]")
        elif count > 0 and (start < 0 or end <= start):
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
                problems.append(f"{layout.labels[i]}: base_model {base_ref} is not one of the slice's sources; list it there "
                                f"with a layer_range (as mergekit requires)")
        elif method.base_policy == "required":
            problems.append(f"{layout.labels[i]}: {method.name} needs base_model, one of the slice's sources")
        members = [j for j in range(len(sl.sources)) if j != base_at]
        if not method.min_models <= len(members) <= (method.max_models or len(members)):
            most = method.max_models or "any number of"
            problems.append(f"{layout.labels[i]}: {method.name} takes {method.min_models} to {most} "
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
