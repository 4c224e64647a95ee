"""Match a loaded network's parameter names to the tensor names in its checkpoint files.

Statistics files (Fisher, Gram) and learned coefficients are keyed by checkpoint names, the
names the merge engine sees. They usually equal ``named_parameters`` names, except when a head
model was loaded from a bare backbone checkpoint (``bert.encoder...`` in the network,
``encoder...`` in the files) and for tied output embeddings, which the files do not store.
"""

from __future__ import annotations

import torch

from deltawise.errors import InputError, bullet_list
from deltawise.io.reader import ModelReader


def checkpoint_names(model: torch.nn.Module, reader: ModelReader, *, require_all: bool = True) -> dict[str, str]:
    """parameter name -> checkpoint tensor name, for every floating parameter the files hold.

    With ``require_all``, a parameter the files lack (a classification head the checkpoint never
    had, so transformers initialised it at random) is an error: statistics of a random head mean nothing.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    names, missing = {}, []
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if name in reader:
            names[name] = name
        elif prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in reader:
            names[name] = name[len(prefix) + 1 :]
        else:
            missing.append(name)
    if missing and require_all:
        raise InputError(
            f"model {reader.label!r}: parameters of the loaded network are not in its files (a head initialised "
            f"at random? load a checkpoint that has a trained head for this task):\n{bullet_list(missing)}"
        )
    return names
