"""Pairs of tensors (base, fine-tuned) for extraction, with every check done before any work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from deltawise.errors import InputError, bullet_list
from deltawise.io.finite import require_finite
from deltawise.io.reader import ModelReader
from deltawise.io.resolve import resolve_model


@dataclass
class Pair:
    base: ModelReader
    finetuned: ModelReader
    names: list[str]  # floating tensors present in both, in the fine-tuned model's order
    skipped: list[str]  # non-floating tensors that differ (copied from the base on apply)
    missing: list[str]  # base tensors the fine-tuned model lacks (the delta leaves them unchanged)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Each (name, base tensor, fine-tuned tensor); InputError naming the tensor for NaN/inf in either."""
        for name in self.names:
            base, finetuned = self.base.get(name), self.finetuned.get(name)
            require_finite(base, self.base.label, name)
            require_finite(finetuned, self.finetuned.label, name)
            yield name, base, finetuned

    def missing_warning(self) -> list[str]:
        """One warning listing the base tensors the fine-tuned model lacks, or none."""
        if not self.missing:
            return []
        shown = ", ".join(self.missing[:20]) + (f" and {len(self.missing) - 20} more" if len(self.missing) > 20 else "")
        return [f"{len(self.missing)} tensor(s) of the base are missing from the fine-tuned model, so the delta leaves "
                f"them unchanged (apply keeps the base's values): {shown}"]


def open_pair(finetuned: str, base: str) -> Pair:
    ft = ModelReader(resolve_model(finetuned), label=finetuned)
    b = ModelReader(resolve_model(base), label=base)
    problems = architecture_problems(b, ft, "base", "fine-tuned model")
    names, skipped = [], []
    for name in ft.keys():
        if name not in b:
            problems.append(f"{name} is in the fine-tuned model but not in the base")
            continue
        fi, bi = ft.info(name), b.info(name)
        if fi.shape != bi.shape:
            problems.append(f"{name} has shape {list(fi.shape)} in the fine-tuned model, {list(bi.shape)} in the base")
        elif fi.dtype.is_floating_point and bi.dtype.is_floating_point:
            names.append(name)
        elif not torch.equal(ft.get(name), b.get(name)):
            skipped.append(name)
    if problems:
        raise InputError(f"{finetuned} is not a fine-tune of {base}:\n" + bullet_list(problems))
    missing = [name for name in b.keys() if name not in ft]
    return Pair(b, ft, names, skipped, missing)


def architecture_problems(a: ModelReader, b: ModelReader, a_name: str, b_name: str) -> list[str]:
    arch_a = (a.config or {}).get("architectures")
    arch_b = (b.config or {}).get("architectures")
    if arch_a and arch_b and list(arch_a) != list(arch_b):
        return [f"the {a_name} is {', '.join(arch_a)}, the {b_name} is {', '.join(arch_b)}"]
    return []
