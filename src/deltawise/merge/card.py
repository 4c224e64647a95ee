"""What travels with merged weights: config, tokenizer files and a model card.

The card records the recipe and a fingerprint of every input, so a merged model can be
traced back to exactly what produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from deltawise.architecture import LAYER_INDEX_LISTS, config_value
from deltawise.errors import InputError
from deltawise.io.dtypes import dtype_name, parse_dtype
from deltawise.delta.labels import with_labels
from deltawise.io.files import OTHER_FILES, TOKENIZER_FILES, copy_present
from deltawise.io.resolve import resolve_model

if TYPE_CHECKING:
    from deltawise.merge.plan import MergePlan

def tokenizer_folder(plan: "MergePlan") -> Optional[Path]:
    source = plan.recipe.tokenizer_source
    if source in (None, "base"):
        return plan.template.reader.folder
    for m in plan.inputs + ([plan.base] if plan.base else []):
        if m.ref == source:
            return m.reader.folder
    try:
        path = resolve_model(source)
    except InputError as exc:
        raise InputError(f"tokenizer_source: {exc}") from None
    return path if path.is_dir() else path.parent


def has_tokenizer(folder: Optional[Path]) -> bool:
    return folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES)


def copy_model_files(plan: "MergePlan", dest: Path) -> None:
    if plan.vocabulary is not None:  # the merged vocabulary's tokenizer, written afresh
        plan.vocabulary.save(dest)
    else:
        copy_present(tokenizer_folder(plan), dest, TOKENIZER_FILES)
        if plan.recipe.chat_template:
            _set_chat_template(plan, dest)
    copy_present(plan.template.reader.folder, dest, OTHER_FILES)


def _set_chat_template(plan: "MergePlan", dest: Path) -> None:
    """The copied tokenizer saved again with the recipe's chat template (mergekit does the same)."""
    from deltawise.merge.vocabulary import chat_template, load_tokenizer

    folder = tokenizer_folder(plan)
    if not has_tokenizer(dest):  # the plan warned: there is no tokenizer to hold the template
        return
    tokenizer = load_tokenizer(dest, "the merged model")
    sources = {"template": tokenizer}
    if plan.recipe.chat_template == "auto":  # the most common template among the models that have a tokenizer
        for m in plan.inputs:
            if m.reader.folder != folder and has_tokenizer(m.reader.folder):
                sources[m.ref] = load_tokenizer(m.reader.folder, m.ref)
    template = chat_template(plan.recipe, sources)
    if template is not None:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(str(dest))


def output_config(plan: "MergePlan") -> Optional[dict[str, Any]]:
    config = plan.template.config
    if config is None:
        return None
    config = dict(config)
    if plan.layout is not None:  # a sliced recipe stacks its own number of layers, per module
        configs = {m.ref: m.config or {} for m in plan.inputs}
        for module in plan.layout.modules:
            if module.count_key is None:  # mergekit's default module of a multi-module model: no layers
                continue
            *path, leaf = module.count_key.split(".")
            config = _with_copied(config, path)
            section = config
            for part in path:
                section = section[part]
            if path == ["text_config"] and config.get(leaf) == section.get(leaf):  # a hub config's top-level copy
                config[leaf] = module.num_layers  # (Qwen2-VL's: mergekit's key for its text layers)
            section[leaf] = module.num_layers
            if isinstance(section.get("layer_types"), list):  # per-layer kinds (sliding/full attention) follow their layers
                section["layer_types"] = [(config_value(configs[ref], ".".join(path + ["layer_types"])) or
                                           section["layer_types"])[layer] for ref, layer in module.layer_origins]
            for key in LAYER_INDEX_LISTS:  # index lists (cross-attention layers) follow their layers too
                if isinstance(section.get(key), list):
                    section[key] = [out for out, (ref, layer) in enumerate(module.layer_origins)
                                    if layer in (config_value(configs[ref], ".".join(path + [key])) or [])]
    if plan.labels:  # a classification head the inputs added (merge/heads.py): its labels, as eval reads them
        config = with_labels(config, plan.labels)
    if plan.vocabulary is not None:
        config["vocab_size"] = plan.vocabulary.rows
    wanted = plan.recipe.out_dtype or plan.recipe.dtype
    if wanted:
        name = dtype_name(parse_dtype(wanted))
        # transformers 5 reads "dtype"; older releases read "torch_dtype"
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = name
    return config


def _with_copied(config: dict[str, Any], path: list[str]) -> dict[str, Any]:
    """``config`` with the sub-configs along ``path`` copied, so that writing into them leaves the input's alone."""
    config = dict(config)
    section = config
    for part in path:
        section[part] = dict(section.get(part) or {})
        section = section[part]
    return config


def model_card(plan: "MergePlan", manifest: dict[str, Any]) -> str:
    base = plan.base.ref if plan.base else None
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- deltawise"]
    if base:
        lines += [f"base_model: {base}"]
    lines += ["---", "", f"# Merged model ({plan.method.name})", ""]
    lines += [f"Made with [deltawise](https://github.com/deltawise/deltawise) `{manifest['deltawise_version']}` "
              f"using **{plan.method.name}**: {plan.method.summary}.", ""]
    lines += ["## Inputs", "", "| model | size (bytes) | fingerprint (sha256 of headers) |", "|---|---|---|"]
    for item in manifest["inputs"]:
        lines.append(f"| {item['model']} | {item['bytes']} | `{item['fingerprint'][:16]}…` |")
    lines += ["", "## Recipe", "", "```yaml", plan.recipe.to_yaml().rstrip(), "```", ""]
    if plan.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in plan.warnings] + [""]
    return "\n".join(lines)
