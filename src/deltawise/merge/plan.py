"""Turn a recipe into a fully validated merge plan, before any tensor data is read.

Everything that can be checked from headers and configs is checked here, and all problems
are reported together in one message: unknown method or parameters, parameter values and
ranges for every tensor, model counts, missing tensors, shape mismatches, vocabulary-size
differences and tied embeddings.

Rules (documented in docs/merging.md):
- Output tensors are the base model's (or, without a base, the first model's), in natural
  order (layer 2 before layer 10). A ``slices:``/``modules:`` recipe lists its layers itself
  (``deltawise.merge.slices``); each tensor then names the models it combines (``TensorPlan.inputs``).
- Integer/bool tensors and tensors matching ``exclude`` are copied from that template model.
- A classification head the inputs add to a base without one is copied, or averaged over the
  inputs that have it (``deltawise.merge.heads``), and its labels go into the output's config.
- Tied embeddings: a model without its output head (``lm_head.weight``) whose config ties word
  embeddings contributes its input embedding in its place. If the template itself is tied, the
  output stays tied and other models' separate output head is ignored (with a warning). Which
  names pair up is the architecture module's table (``deltawise.architecture``).
- Vocabulary: with ``tokenizer_source`` or ``tokenizer:``, rows are matched by token string
  (``deltawise.merge.vocabulary``). Without, models whose tokenizers give a merged row different
  tokens are refused; an embedding-like tensor (first dimension = the model's vocab_size, or a token
  embedding/LM head by its role) with more rows than the template's is cut to the template's rows,
  with a warning; fewer rows is an error. Any other shape difference is an error.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


from deltawise.architecture import architecture_for, file_modules_for, modules_for
from deltawise.delta.reader import open_model
from deltawise.errors import InputError, RecipeError, bullet_list
from deltawise.io.dtypes import parse_dtype
from deltawise.io.layout import natural_key
from deltawise.io.reader import ModelReader
from deltawise.io.writer import OutputTensor
import deltawise.merge.methods  # noqa: F401  (importing the package registers every method)
from deltawise.merge.base import REGISTRY, MergeMethod, SideInput
from deltawise.merge.heads import added_heads
from deltawise.merge.params import ParamError, layer_position, leaf_problems, resolve
from deltawise.merge.recipe import Recipe
from deltawise.merge.sources import find_source, tensor_source
from deltawise.merge.aligned import vocabulary_for
from deltawise.merge.vocabulary import Vocabulary, tokenizer_settings, vocabulary_problems
from deltawise.merge.slices import (SliceLayout, expand, parameter_settings, same_model, slice_groups, slice_parameters,
                                    source_refs)


@dataclass
class InputModel:
    ref: str  # as written in the recipe
    reader: ModelReader  # or a DeltaReader (same interface) for a delta folder / PEFT adapter
    settings: dict[str, Any] = field(default_factory=dict)  # the model's own `parameters`

    @property
    def config(self) -> Optional[dict]:
        return self.reader.config


@dataclass
class TensorPlan:
    name: str
    out: OutputTensor
    merge: bool  # False: copied from the template model
    sources: list[str] = field(default_factory=list)  # tensor name to read in each input
    base_source: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)
    model_params: list[dict[str, Any]] = field(default_factory=list)
    # the models this tensor combines and its base, where they are not the plan's (each slice of a
    # sliced recipe has its own); None: the plan's inputs and base (MergePlan.inputs_of, base_of)
    inputs: Optional[list[InputModel]] = None
    base: Optional[InputModel] = None

    @property
    def out_numel(self) -> int:
        n = 1
        for s in self.out.shape:
            n *= s
        return n


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    base: Optional[InputModel]
    inputs: list[InputModel]  # what the method combines, in order
    template: InputModel  # names, config and tokenizer of the output
    tensors: list[TensorPlan]
    warnings: list[str]
    side_inputs: list[SideInput] = field(default_factory=list)  # statistics files (Fisher, Gram)
    layout: Optional[SliceLayout] = None  # a sliced recipe's layer stacks (the output's layer counts)
    labels: Optional[dict[str, int]] = None  # label2id of a classification head the inputs add (merge/heads.py)
    vocabulary: Optional[Vocabulary] = None  # tokenizer_source/tokenizer: rows matched by token string

    def inputs_of(self, t: TensorPlan) -> list[InputModel]:
        return self.inputs if t.inputs is None else t.inputs

    def base_of(self, t: TensorPlan) -> Optional[InputModel]:
        """The model ``t``'s task vectors are taken against (None: the method combines the inputs alone)."""
        if t.inputs is not None:
            return t.base
        return self.base if self.method.base_policy != "input" else None

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.merge]

    @property
    def readers(self) -> list[ModelReader]:
        seen, out = set(), []
        for m in ([self.base] if self.base else []) + self.inputs + [self.template]:
            if id(m.reader) not in seen:
                seen.add(id(m.reader))
                out.append(m.reader)
        return out

    @property
    def side_readers(self) -> list[ModelReader]:
        """The statistics files a data-driven method reads (files, not model folders)."""
        return [r for side in self.side_inputs for r in side.readers]

    def output_bytes(self) -> int:
        return sum(t.out.nbytes for t in self.tensors)


def build_plan(recipe: Recipe, *, allow_pickle: bool = False, strict: bool = False) -> MergePlan:
    """The validated plan of ``recipe``; raises RecipeError listing every problem (``strict``: every
    warning too, e.g. an ignored parameter)."""
    problems: list[str] = []
    warnings: list[str] = []

    method_cls = REGISTRY.get(recipe.merge_method)
    if method_cls is None:
        raise RecipeError(
            f"unknown merge_method {recipe.merge_method!r}; available: {', '.join(sorted(REGISTRY))}"
        )
    method = method_cls()
    specs = {p.name: p for p in method.params}
    known = ", ".join(sorted(specs)) or "none"
    settings = [("parameters", recipe.parameters)] + [(f"models[{i}].parameters", e.parameters)
                                                      for i, e in enumerate(recipe.models)] + parameter_settings(recipe)
    for where, given in settings:
        for key, setting in given.items():
            if key not in specs:
                is_error, message = _foreign_parameter(f"{where}.{key}", key, method.name, specs, known)
                (problems if is_error else warnings).append(message)
            else:
                problems.extend(f"{where}.{key}: {msg}" for msg in leaf_problems(specs[key], setting))
    for pattern in recipe.exclude:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"exclude: {pattern!r} is not a valid regular expression ({exc})")
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None:
            try:
                parse_dtype(value)
            except RecipeError as exc:
                problems.append(f"{key}: {exc}")

    refs = source_refs(recipe) if recipe.sliced else [e.model for e in recipe.models]
    for i, ref in enumerate(refs):
        first = None if recipe.sliced else next((j for j in range(i) if same_model(ref, refs[j])), None)
        if first is not None:  # one line per repeat, naming the first listing
            problems.append(f"models[{i}] ({ref}) is the same model as models[{first}]")
    if method.base_policy == "required" and recipe.base_model is None and not recipe.sliced:
        problems.append(f"{method.name} needs base_model (task vectors are taken relative to it)")

    # open every input (headers only); report all unreadable inputs at once
    readers: dict[str, ModelReader] = {}
    input_problems: list[str] = []
    for ref in dict.fromkeys(refs + ([recipe.base_model] if recipe.base_model else [])):
        try:
            # a delta folder or PEFT adapter reads as base + delta (the recipe's base_model when given)
            readers[ref] = open_model(ref, allow_pickle=allow_pickle,
                                      base_ref=recipe.base_model if ref != recipe.base_model else None)
            warnings.extend(getattr(readers[ref], "warnings", []))
        except InputError as exc:
            input_problems.append(str(exc) + _recipe_folder_hint(ref, recipe))
    if problems or input_problems:
        raise RecipeError("the recipe cannot run:\n" + bullet_list(problems + input_problems))
    vocabulary, readers = vocabulary_for(recipe, readers, warnings)
    if recipe.sliced:
        return _finish(_sliced_plan(recipe, method, readers, problems, warnings), problems, strict, vocabulary)

    entries = {e.model: InputModel(e.model, readers[e.model], dict(e.parameters)) for e in recipe.models}
    base = None
    if recipe.base_model is not None:
        base_entry = next((m for ref, m in entries.items() if same_model(ref, recipe.base_model)), None)
        base = base_entry or InputModel(recipe.base_model, readers[recipe.base_model])
    if method.base_policy != "input":
        inputs = [m for m in entries.values() if base is None or m is not base]
    else:
        inputs = list(entries.values()) + ([base] if base is not None and all(m is not base for m in entries.values()) else [])
    if len(inputs) < method.min_models:
        problems.append(f"{method.name} needs at least {method.min_models} model(s) besides the base, got {len(inputs)}")
    if method.max_models is not None and len(inputs) > method.max_models:
        problems.append(f"{method.name} takes at most {method.max_models} model(s) besides the base, got {len(inputs)}")
    template = base if base is not None else (inputs[0] if inputs else None)
    if template is None or problems:
        raise RecipeError("the recipe cannot run:\n" + bullet_list(problems))

    out_dtype = parse_dtype(recipe.out_dtype or recipe.dtype) if (recipe.out_dtype or recipe.dtype) else None
    roles = architecture_for(template.config)
    num_layers = roles.num_layers(template.reader.keys())
    stacks = modules_for(template.config, template.reader.keys())  # several layer stacks: depth within each, as mergekit
    # a model of one of mergekit's architecture files: depth within each of its modules, as mergekit plans it
    stacks = file_modules_for(template.config, template.reader.keys()) or stacks
    exclude = [re.compile(p) for p in recipe.exclude]
    readers_in = [m.reader for m in inputs]
    base_reader = base.reader if (base and method.base_policy != "input") else None

    tensors: list[TensorPlan] = []
    vocab_warned: set[str] = set()
    for name in sorted(template.reader.keys(), key=natural_key):
        info = template.reader.info(name)
        floating = info.dtype.is_floating_point
        dtype = out_dtype if (out_dtype is not None and floating) else info.dtype
        out = OutputTensor(name, info.shape, dtype)
        if not floating or any(p.search(name) for p in exclude):
            tensors.append(TensorPlan(name, out, merge=False))
            continue
        plan = TensorPlan(name, out, merge=True)
        involved = ([(base, base_reader)] if base_reader else []) + list(zip(inputs, readers_in))
        ok = True
        for k, (model, reader) in enumerate(involved):
            source = tensor_source(name, name, info.shape, model, template.ref, problems, warnings, vocab_warned)
            if source is None:
                ok = False
            elif base_reader is not None and k == 0:
                plan.base_source = source
            else:
                plan.sources.append(source)
        if not ok:
            continue
        layer, count = stacks.depth(name, template.config) if stacks else (roles.layer_index(name), num_layers)
        t = layer_position(layer, count)
        global_sources = [recipe.parameters]
        try:
            plan.params = {p.name: resolve(p, global_sources, name, t) for p in method.params if p.scope == "global"}
            plan.model_params = [
                {p.name: resolve(p, [m.settings, recipe.parameters], name, t) for p in method.params if p.scope == "model"}
                for m in inputs
            ]
        except ParamError as exc:
            problems.append(f"{name}: {exc}")
            continue
        plan.merge = not method.copies(plan.params, plan.model_params)
        tensors.append(plan)

    heads, labels = added_heads(template, inputs, problems, warnings)
    for head in heads:  # copied from the one input that has it, or the mean of several (merge/heads.py)
        dtype = out_dtype if out_dtype is not None else head.info.dtype
        source = head.source if isinstance(head.source, InputModel) else InputModel(head.source_ref, head.source)
        tensors.append(TensorPlan(head.name, OutputTensor(head.name, head.info.shape, dtype), merge=False,
                                  sources=[head.name], inputs=[source]))
    _note_tied_extras(template, inputs, warnings)
    return _finish(MergePlan(recipe, method, base, inputs, template, tensors, warnings, labels=labels), problems,
                   strict, vocabulary)


def _finish(result: MergePlan, problems: list[str], strict: bool, vocabulary: Optional[Vocabulary] = None) -> MergePlan:
    """Checks of the whole plan (vocabularies, the method's own); raises with every problem."""
    warnings = result.warnings
    method = result.method
    result.vocabulary = vocabulary
    if vocabulary is None and tokenizer_settings(result.recipe) is None and not problems:
        problems.extend(vocabulary_problems(result))
        from deltawise.merge.card import has_tokenizer, tokenizer_folder

        if result.recipe.chat_template and not has_tokenizer(tokenizer_folder(result)):
            warnings.append(f"chat_template: {tokenizer_folder(result)} holds no tokenizer files, so the merged model has "
                            "no tokenizer to hold the template; it is not written")
    if not problems:
        result.side_inputs = method.side_inputs(result)
        problems.extend(method.check(result))
    if problems:
        raise RecipeError("the recipe cannot run:\n" + bullet_list(_unique(problems)))
    if strict and warnings:
        raise RecipeError("the recipe has warnings, which --strict makes errors:\n" + bullet_list(_unique(warnings)))
    return result


def _sliced_plan(recipe: Recipe, method: MergeMethod, readers: dict[str, ModelReader], problems: list[str],
                 warnings: list[str]) -> MergePlan:
    """The plan of a ``slices:``/``modules:`` recipe (``deltawise.merge.slices`` has the rules)."""
    layout, found = expand(recipe, lambda ref: list(readers[ref].keys()), lambda ref: architecture_for(readers[ref].config),
                           lambda ref: readers[ref].config)
    models = {ref: InputModel(ref, reader) for ref, reader in readers.items()}
    groups = slice_groups(layout, recipe, method, found)
    if found:
        raise RecipeError("the recipe cannot run:\n" + bullet_list(problems + found))
    template = models[recipe.base_model] if recipe.base_model else models[layout.slices[0].sources[0].model]
    out_dtype = parse_dtype(recipe.out_dtype or recipe.dtype) if (recipe.out_dtype or recipe.dtype) else None
    exclude = [re.compile(p) for p in recipe.exclude]
    tensors, vocab_warned = [], set()
    for st in sorted(layout.tensors, key=lambda st: natural_key(st.name)):
        sl, (base_at, members) = layout.slices[st.slice_index], groups[st.slice_index]
        order = ([base_at] if base_at is not None else []) + members
        first = models[sl.sources[order[0]].model]
        first_name = find_source(st.source_names[order[0]], first, first.reader)
        if first_name is None:
            problems.append(f"{first.ref} has no tensor {st.source_names[order[0]]!r}")
            continue
        info = first.reader.info(first_name)
        floating = info.dtype.is_floating_point
        out = OutputTensor(st.name, info.shape, out_dtype if (out_dtype is not None and floating) else info.dtype)
        if not floating or any(p.search(st.name) for p in exclude):  # copied from the slice's base or first source
            tensors.append(TensorPlan(st.name, out, merge=False, sources=[first_name], inputs=[first]))
            continue
        plan = TensorPlan(st.name, out, merge=True, inputs=[models[sl.sources[j].model] for j in members],
                          base=first if base_at is not None else None)
        names = [tensor_source(st.name, st.source_names[j], info.shape, models[sl.sources[j].model], first.ref, problems,
                         warnings, vocab_warned) for j in order]
        if None in names:
            continue
        plan.base_source, plan.sources = (names[0], names[1:]) if base_at is not None else (None, names)
        try:
            shared = [layout.module_of(st.slice_index).parameters, recipe.parameters]
            plan.params, plan.model_params = slice_parameters(method, st, sl, members, shared)
        except ParamError as exc:
            problems.append(f"{st.name}: {exc}")
            continue
        plan.merge = not method.copies(plan.params, plan.model_params)
        tensors.append(plan)
    if any(t.params.get("granularity") == "global" for t in tensors):
        problems.append("granularity: global needs the same models for every tensor; a sliced recipe merges per slice")
    inputs = [models[ref] for ref in dict.fromkeys(s.model for sl in layout.slices for s in sl.sources)]
    base = models[recipe.base_model] if recipe.base_model else None
    return MergePlan(recipe, method, base, inputs, template, tensors, warnings, layout=layout)


def _recipe_folder_hint(ref: str, recipe: Recipe) -> str:
    """For a model path missing from the working directory: whether it exists next to the recipe file.

    Paths in a recipe are resolved against the working directory, as mergekit does, so a recipe run
    from another folder finds nothing; saying where the path does exist makes the fix obvious."""
    path = Path(ref).expanduser()
    if path.is_absolute() or path.exists() or recipe.path is None:
        return ""
    beside = recipe.path.parent / path
    if not beside.exists() or os.path.realpath(recipe.path.parent) == os.path.realpath(Path.cwd()):
        return ""
    return (f"; it does exist relative to the recipe's folder, as {os.path.abspath(beside)}: run from "
            f"{os.path.abspath(recipe.path.parent)}, or write the path as {os.path.normpath(beside)}")


def _foreign_parameter(label: str, key: str, method: str, specs: dict, known: str) -> tuple[bool, str]:
    """(is_error, message) for a recipe parameter that ``method`` does not take.

    mergekit ignores such parameters, and recipes copied from model cards carry them (``density`` on
    ``model_stock``): a parameter of another method is ignored with a warning. A name no method takes
    but close to one that some method does is taken for a typo (``desnity``): an error naming the
    likely parameter. Any other name is ignored with a warning."""
    every = {p.name for cls in REGISTRY.values() for p in cls.params}
    if key in every:
        return False, f"{label}: not a parameter of {method}, ignored (it takes: {known})"
    close = difflib.get_close_matches(key, sorted(specs), n=1, cutoff=0.8) or difflib.get_close_matches(
        key, sorted(every), n=1, cutoff=0.8
    )
    if close:
        return True, f"{label}: unknown parameter; did you mean {close[0]!r}? ({method} takes: {known})"
    return False, f"{label}: not a parameter of any method, ignored ({method} takes: {known})"


def _note_tied_extras(template: InputModel, inputs: list[InputModel], warnings: list[str]) -> None:
    for out_name in architecture_for(template.config).tied_outputs():
        if out_name in template.reader:
            continue
        for m in inputs:
            if m is not template and out_name in m.reader:
                warnings.append(
                    f"{m.ref} has its own {out_name} but {template.ref} ties it to the input embedding; "
                    f"the output stays tied, so {m.ref}'s {out_name} is not merged"
                )


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
