"""Classification heads that the inputs of a merge add to a base without one.

A classifier trained from a causal LM (``train --task classification``, PEFT or our own methods)
is ``base + delta`` plus a new head (``score.weight``) that the base does not have. Output tensors
are the template's (the base's), so without this module such a head would be left out of the merged
model. The rule:

- a head only one input has is copied from it (the other inputs, e.g. a language adapter, do not
  touch it);
- a head several inputs have is their mean: there is no base head to take task vectors against,
  and the mean is what a uniform soup of the heads gives (Wortsman et al. 2022, arXiv 2203.05482).
  Their shapes and their labels must agree;
- the output's config gets the head's labels (``label2id``/``id2label``, ``delta/labels.py``).

Each added head is reported as a warning, so the user sees where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch

from deltawise.architecture import Role, architecture_for
from deltawise.delta.labels import head_labels
from deltawise.delta.reader import DeltaReader
from deltawise.io.reader import TensorInfo

if TYPE_CHECKING:
    from deltawise.merge.plan import InputModel


@dataclass
class MeanOfInputs:
    """Reads a tensor as the mean of several inputs' values (accumulated in float32), for the loader's copy path."""

    models: list["InputModel"]

    def info(self, name: str) -> TensorInfo:
        return self.models[0].reader.info(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        values = [m.reader.get_rows(name, start, stop) for m in self.models]
        return (sum(v.float() for v in values) / len(values)).to(values[0].dtype)

    def get(self, name: str) -> torch.Tensor:
        values = [m.reader.get(name) for m in self.models]
        return (sum(v.float() for v in values) / len(values)).to(values[0].dtype)


def input_labels(model: "InputModel", rows: int) -> dict[str, int]:
    """The labels of ``model``'s head of ``rows`` classes: for a delta or adapter what train recorded beside it,
    for a classifier checkpoint its config's; else transformers' defaults (``LABEL_0`` ...)."""
    if isinstance(model.reader, DeltaReader):
        return head_labels(model.reader.folder, rows)
    recorded = (model.config or {}).get("label2id")
    if isinstance(recorded, dict) and len(recorded) == rows:
        return {str(k): int(v) for k, v in recorded.items()}
    return {f"LABEL_{i}": i for i in range(rows)}


@dataclass
class AddedHead:
    """A head tensor the output gets from ``source``: the one input that has it, or the mean of several."""

    name: str
    info: TensorInfo
    source: Union["InputModel", MeanOfInputs]
    source_ref: str


def added_heads(template: "InputModel", inputs: list["InputModel"], problems: list[str],
                warnings: list[str]) -> tuple[list[AddedHead], Optional[dict[str, int]]]:
    """The classification-head tensors that inputs add to the template, and the head's labels."""
    roles = architecture_for(template.config)
    holders: dict[str, list["InputModel"]] = {}
    for model in inputs:
        for name in model.reader.keys():
            if name not in template.reader and roles.role(name) == Role.CLASSIFIER \
                    and model.reader.info(name).dtype.is_floating_point:
                holders.setdefault(name, []).append(model)
    heads: list[AddedHead] = []
    labels: Optional[dict[str, int]] = None
    for name, models in sorted(holders.items()):
        shapes = {tuple(m.reader.info(name).shape) for m in models}
        if len(shapes) > 1:
            problems.append(f"{name}: a new classification head in {', '.join(m.ref for m in models)} with different "
                            f"shapes {sorted(shapes)}: heads for different label sets cannot be merged")
            continue
        info = models[0].reader.info(name)
        if len(info.shape) == 2:
            found = {m.ref: input_labels(m, info.shape[0]) for m in models}
            if len({tuple(sorted(v.items())) for v in found.values()}) > 1:
                problems.append(f"{name}: the inputs' heads have different labels ({found}); they cannot be merged")
                continue
            labels = next(iter(found.values()))
        mean = f"mean of {', '.join(m.ref for m in models)}"
        heads.append(AddedHead(name, info, models[0], models[0].ref) if len(models) == 1
                     else AddedHead(name, info, MeanOfInputs(models), mean))
        how = f"copied from {models[0].ref}" if len(models) == 1 else f"the mean of {', '.join(m.ref for m in models)}"
        warnings.append(f"{name} is a classification head the base does not have: {how}")
    return heads, labels
