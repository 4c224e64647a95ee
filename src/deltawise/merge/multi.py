"""Multi-stage recipes (mergekit-multi's format): several recipes in one YAML file, one document
each, with a ``name``; a later stage uses an earlier one's output by writing its name where a model
goes (``model``, ``base_model``, ``tokenizer_source``, a token's ``source``).

Stages run in dependency order (file order among independent ones). A named stage is written to
``WORK/<name>``; the unnamed stage (at most one; without one, the last document) is the final
merge, written to OUT. Every stage output is verified (shard sizes and sha256 against its manifest)
before a later stage reads it. A stage whose folder holds a verified output of the same recipe and
the same inputs (fingerprints) is not merged again, so a rerun after an interruption continues
where it stopped; an interrupted stage continues from its completed shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from deltawise.errors import OutputError, RecipeError
from deltawise.io.output import MANIFEST, staging_folder
from deltawise.merge.recipe import parse_recipe

MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")


@dataclass
class Stage:
    name: Optional[str]  # None: the final merge
    data: dict[str, Any]  # the recipe, stage names replaced by their output folders
    needs: list[str] = field(default_factory=list)


def read_documents(path: Path) -> list[Any]:
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None


def is_multi_stage(path: Path) -> bool:
    """Whether the recipe file holds several recipes (YAML documents)."""
    try:
        return len(read_documents(path)) > 1
    except RecipeError:
        return False  # the single-recipe reader reports it


def load_stages(path: Path, work_dir: Path) -> list[Stage]:
    """The stages of a multi-stage recipe file, in the order they run; every problem at once."""
    docs = read_documents(path)
    problems: list[str] = []
    named: dict[Optional[str], dict] = {}
    for k, doc in enumerate(docs):
        if not isinstance(doc, dict):
            problems.append(f"document {k + 1}: a recipe is a YAML mapping")
            continue
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
            problems.append(f"document {k + 1}: name {name!r} must be a plain folder name")
            continue
        if name in named:
            problems.append("more than one unnamed (final) recipe" if name is None else f"two recipes are named {name!r}")
            continue
        named[name] = doc
    if problems:
        raise RecipeError(f"{path}:\n" + "\n".join(f"  - {p}" for p in problems))
    final = None if None in named else list(named)[-1]
    stages = {}
    for name, doc in named.items():
        used: list[str] = []
        data = _replace_names(doc, {n for n in named if n is not None}, work_dir, used)
        stages[name] = Stage(name, data, list(dict.fromkeys(used)))
    for name, stage in stages.items():
        if final in stage.needs:
            problems.append(f"{name or 'the final recipe'} uses {final!r}, the final merge (written to OUT, not WORK)")
        if name in stage.needs:
            problems.append(f"{name!r} uses its own output")
    for name, stage in stages.items():  # each recipe checked on its own, before anything runs
        try:
            parse_recipe(stage.data, f"{path} ({name or 'final recipe'})")
        except RecipeError as exc:
            problems.append(str(exc))
    if problems:
        raise RecipeError(f"{path}:\n" + "\n".join(f"  - {p}" for p in problems))
    order = _dependency_order(stages, path)
    for stage in order:
        if stage.name == final:
            stage.name = None
    return order


def _replace_names(value: Any, names: set[str], work_dir: Path, used: list[str], key: Optional[str] = None) -> Any:
    if isinstance(value, dict):
        return {k: _replace_names(v, names, work_dir, used, k) for k, v in value.items()}
    if isinstance(value, list):
        # bare strings in a models list name models too
        return [_replace_names(v, names, work_dir, used, "model" if key == "models" else key) for v in value]
    if isinstance(value, str) and key in MODEL_KEYS and value in names:
        used.append(value)
        return str(work_dir / value)
    return value


def _dependency_order(stages: dict[Optional[str], Stage], path: Path) -> list[Stage]:
    order: list[Stage] = []
    state: dict[Optional[str], str] = {}

    def visit(name: Optional[str], chain: list) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise RecipeError(f"{path}: the recipes use each other in a cycle: {' -> '.join(map(str, chain + [name]))}")
        state[name] = "active"
        for need in stages[name].needs:
            visit(need, chain + [name])
        state[name] = "done"
        order.append(stages[name])

    for name in stages:
        visit(name, [])
    return order


@dataclass
class StageResult:
    name: Optional[str]
    out: Path
    skipped: bool  # a verified output of the same recipe and inputs was there already


def run_stages(path: Path, out: Path, work_dir: Path, merge_options, *, allow_pickle: bool = False, strict: bool = False,
               on_stage: Optional[Callable[[Stage, Path, bool], None]] = None) -> list[StageResult]:
    """Run every stage of the multi-stage recipe ``path``; the final one into ``out`` with ``merge_options``
    (an ``engine.MergeOptions``), the others into ``work_dir``."""
    from dataclasses import replace

    from deltawise.merge.engine import run_merge
    from deltawise.merge.plan import build_plan

    work_dir, out = Path(work_dir), Path(out)
    stages = load_stages(path, work_dir.resolve())
    results = []
    for stage in stages:
        target = out if stage.name is None else work_dir / stage.name
        plan = build_plan(parse_recipe(stage.data, f"{path} ({stage.name or 'final recipe'})"),
                          allow_pickle=allow_pickle, strict=strict)
        done = finished_output(target, plan)
        if on_stage is not None:
            on_stage(stage, target, done)
        if not done:
            if stage.name is None:
                options = merge_options
            else:
                if target.exists() and any(target.iterdir()) and not (target / MANIFEST).is_file():
                    raise OutputError(f"{target} exists and holds no deltawise merge; it is not replaced by stage "
                                      f"{stage.name!r}: remove it or choose another work folder")
                interrupted = staging_folder(target).exists()
                options = replace(merge_options, overwrite=True, resume=interrupted, restart=False)
                target.parent.mkdir(parents=True, exist_ok=True)
            try:
                run_merge(plan, target, options)
            except OutputError:
                if stage.name is None or not options.resume:
                    raise
                run_merge(plan, target, replace(options, resume=False, restart=True))  # another recipe's shards
        _require_verified(target, stage)
        results.append(StageResult(stage.name, target, done))
    return results


def finished_output(folder: Path, plan) -> bool:
    """Whether ``folder`` holds a verified merge of ``plan``'s recipe from the same inputs."""
    from deltawise.io.verify import verify_folder

    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return False
    if manifest.get("recipe") != plan.recipe.model_dump(mode="json", exclude_none=True):
        return False
    if [(i.get("model"), i.get("fingerprint")) for i in manifest.get("inputs", [])] != [
            (r.label, r.fingerprint()) for r in plan.readers]:
        return False
    return verify_folder(folder).ok


def _require_verified(folder: Path, stage: Stage) -> None:
    from deltawise.io.verify import verify_folder

    report = verify_folder(folder)
    if not report.ok:
        raise OutputError(f"stage {stage.name or 'final'} ({folder}) failed verification: " + "; ".join(report.problems))
