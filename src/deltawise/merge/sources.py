"""Which tensor of an input model feeds an output tensor, and whether its shape fits.

Shared by whole-model and sliced plans (``deltawise.merge.plan``): tied embeddings (an input that ties
its LM head to its input embedding contributes the embedding), and vocabulary rows (an input with more
rows than the output is cut to the output's rows, with a warning; fewer rows is an error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from deltawise.architecture import architecture_for

if TYPE_CHECKING:
    from deltawise.io.reader import ModelReader
    from deltawise.merge.plan import InputModel


def tensor_source(name: str, wanted: str, shape: tuple, model: "InputModel", template_ref: str, problems: list[str],
                  warnings: list[str], vocab_warned: set[str]) -> Optional[str]:
    """The tensor of ``model`` read for output ``name`` (``wanted``, or the input embedding it ties to),
    checked against the output's ``shape``; None after adding the problem to ``problems``."""
    reader = model.reader
    source = find_source(wanted, model, reader)
    if source is None:
        problems.append(f"{model.ref} has no tensor {wanted!r}")
        return None
    found = reader.info(source).shape
    if found != shape:
        if not is_vocab_tensor(source, found, shape, model.config):
            problems.append(f"{model.ref}: {wanted} has shape {list(found)}, {template_ref} has {list(shape)}")
            return None
        if found[0] < shape[0]:
            problems.append(f"{model.ref}: {wanted} has {found[0]} vocabulary rows, fewer than the {template_ref}'s "
                            f"{shape[0]}; put the model with the largest vocabulary as base_model")
            return None
        if model.ref not in vocab_warned:  # the loader reads only the output's rows, which is the cut itself
            vocab_warned.add(model.ref)
            warnings.append(f"{model.ref} has a larger vocabulary ({found[0]} rows in {wanted}); only the first "
                            f"{shape[0]} rows (the {template_ref} vocabulary) are merged")
    if source != wanted:
        warnings.append(f"{model.ref} ties {name} to {source}; its {source} is used for {name}")
    return source


def find_source(name: str, model: "InputModel", reader: "ModelReader") -> Optional[str]:
    """``name`` when ``reader`` holds it, else the input embedding a tied output head stands for (or None)."""
    if name in reader:
        return name
    return architecture_for(model.config).tied_alias(name, reader)


def is_vocab_tensor(name: str, shape: tuple, target: tuple, config: Optional[dict]) -> bool:
    """Whether a ``shape`` differing from ``target`` only in rows is a vocabulary's (embedding or LM head)."""
    if len(shape) != len(target) or len(shape) == 0 or shape[1:] != target[1:]:
        return False
    vocab = (config or {}).get("vocab_size")
    return architecture_for(config).is_vocabulary(name) or (vocab is not None and shape[0] == vocab)
