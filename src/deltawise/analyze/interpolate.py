"""Linear-mode-connectivity curves: loss along theta_A + lambda (theta_B - theta_A).

Loss barrier as in Entezari et al. 2022 (arXiv 2110.06296) and Git Re-Basin (arXiv 2209.04836); linear mode
connectivity after Frankle et al. 2020 (arXiv 1912.05671).

Unlike the weight analyses this runs the model, so model A is loaded whole; B enters as the
difference B - A, read tensor by tensor. Writing the path as A + lambda (B - A) (rather than
(1 - lambda) A + lambda B) keeps the endpoints bit-exact, and for two fine-tunes of one base it is
the path theta0 + tau_A + lambda (tau_B - tau_A) between the two task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from deltawise.analyze.results import Interpolation, ModelRef
from deltawise.architecture import architecture_for
from deltawise.data.read import load_items
from deltawise.errors import InputError, bullet_list
from deltawise.eval.models import load_model, model_fingerprint
from deltawise.io.resolve import resolve_model
from deltawise.eval.perplexity import perplexity
from deltawise.delta.reader import open_model


@dataclass
class InterpolationOptions:
    points: int = 11
    max_length: int | None = None
    stride: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    progress: Callable[[int, int], None] | None = None
    trust_remote_code: bool = False  # run Python code shipped in a model folder (--trust-remote-code)
    base: str | None = None  # the base of A or B when either is a delta/adapter folder (default: the recorded one)


def loss_barrier(lambdas: list[float], loss: list[float]) -> tuple[float, float]:
    """max over lambda of L(lambda) - ((1 - lambda) L(0) + lambda L(1)), and where it is reached.

    Assumes lambdas[0] == 0 and lambdas[-1] == 1 (Entezari et al.; Git Re-Basin)."""
    gaps = [l - ((1 - t) * loss[0] + t * loss[-1]) for t, l in zip(lambdas, loss)]
    i = max(range(len(gaps)), key=gaps.__getitem__)
    return gaps[i], lambdas[i]


def _differences(model: torch.nn.Module, b_path: Path, base: str | None = None) -> dict[str, torch.Tensor]:
    """B - A for every floating parameter/buffer B's files hold (B a checkpoint, or a delta on its base);
    refuses mismatched architectures."""
    state = model.state_dict()
    reader = open_model(str(b_path), base_ref=base)
    try:
        problems = [f"{n!r} missing from {b_path}" for n, v in state.items()
                    if v.is_floating_point() and n not in reader and not _tied(model, n)]
        problems += [f"{n!r}: shape {tuple(reader.info(n).shape)} vs {tuple(state[n].shape)}" for n in reader.keys()
                     if n in state and tuple(reader.info(n).shape) != tuple(state[n].shape)]
        if problems:
            raise InputError("the two models differ in architecture:\n" + bullet_list(problems))
        return {n: reader.get(n).to(state[n].dtype) - state[n] for n in reader.keys()
                if n in state and state[n].is_floating_point()}
    finally:
        reader.close()


def _tied(model: torch.nn.Module, name: str) -> bool:
    """An output embedding tied to the input one is not stored separately; it moves with it."""
    return architecture_for(model.config).is_tied_output(name)


def interpolation_curve(a_ref: str, b_ref: str, data: Path, options: InterpolationOptions | None = None) -> Interpolation:
    opts = options or InterpolationOptions()
    if opts.points < 2:
        raise InputError("an interpolation curve needs at least 2 points")
    lm_a = load_model(a_ref, device=opts.device, trust_remote_code=opts.trust_remote_code, base=opts.base)
    lm_b_path = resolve_model(b_ref)
    b_fingerprint = model_fingerprint(lm_b_path, base=opts.base)
    diff = _differences(lm_a.model, lm_b_path, opts.base)
    params = lm_a.model.state_dict()
    start = {n: params[n].clone() for n in diff}
    items = load_items(data)
    max_length = opts.max_length or min(lm_a.context_length, 1024)
    stride = min(opts.stride or max(max_length // 2, 1), max_length)
    docs = [lm_a.tokenizer(i.text)["input_ids"] for i in items]
    lambdas = torch.linspace(0, 1, opts.points, dtype=torch.float64).tolist()
    losses, ppls, n_tokens = [], [], 0
    with torch.no_grad():
        for step, lam in enumerate(lambdas):
            for n, d in diff.items():
                params[n].copy_(start[n] + lam * d)
            ppl = perplexity(lm_a.model, docs, max_length=max_length, stride=stride, batch_size=opts.batch_size,
                             pad_id=lm_a.pad_id)
            losses.append(ppl.mean_nll)
            ppls.append(ppl.value)
            n_tokens = ppl.n_tokens
            if opts.progress:
                opts.progress(step + 1, len(lambdas))
    barrier, at = loss_barrier(lambdas, losses)
    return Interpolation(
        model_a=ModelRef(name=Path(a_ref).name, path=str(lm_a.path), fingerprint=lm_a.fingerprint),
        model_b=ModelRef(name=Path(b_ref).name, path=str(lm_b_path), fingerprint=b_fingerprint),
        data=str(data), n_tokens=n_tokens, lambdas=lambdas, loss=losses, perplexity=ppls, barrier=barrier, barrier_lambda=at,
    )
