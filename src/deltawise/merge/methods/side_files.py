"""Open the per-model statistics files (Fisher, Gram) named by a per-model recipe parameter."""

from __future__ import annotations

from pathlib import Path

from deltawise.errors import InputError, RecipeError, bullet_list
from deltawise.io.reader import ModelReader


def open_side_files(plan, param: str, kind: str) -> list[ModelReader]:
    """One reader per input model, for the file its ``param`` names; every problem reported at once.

    The path must be one value per model (not a per-tensor filter or gradient)."""
    problems, readers = [], []
    for i, model in enumerate(plan.inputs):
        values = {t.model_params[i][param] for t in plan.merged}
        if len(values) != 1:
            problems.append(f"{model.ref}: '{param}' must name one {kind} file for the whole model, got {sorted(values)}")
            continue
        path = Path(values.pop()).expanduser()
        if path.suffix != ".safetensors":
            problems.append(f"{model.ref}: {param}: {path} is not a .safetensors {kind} file (make one with `deltawise {kind}`)")
            continue
        try:
            readers.append(ModelReader(path, label=str(path)))
        except InputError as exc:
            problems.append(f"{model.ref}: {param}: {exc}")
    if problems:
        raise RecipeError("the recipe cannot run:\n" + bullet_list(problems))
    return readers
