"""Call a merge method directly on small tensors, with the recipe defaults filled in."""

from __future__ import annotations

import torch

from deltawise.merge.base import REGISTRY, merge_tensor


def run_method(name, base, models, params=None, model_params=None, stats=None, seed=0, side=None):
    method = REGISTRY[name]()
    params = dict(params or {})
    for p in method.params:
        if p.scope == "global":
            params.setdefault(p.name, p.default)
    per_model = [dict(mp) for mp in (model_params or [{} for _ in models])]
    for mp in per_model:
        for p in method.params:
            if p.scope == "model":
                mp.setdefault(p.name, p.default)
    f = lambda x: None if x is None else torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    side = {k: [f(x) for x in v] for k, v in (side or {}).items()}
    return merge_tensor(method, f(base), [f(m) for m in models], params, per_model, seed=seed, stats=stats, side=side)
