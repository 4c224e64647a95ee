"""Diagonal Fisher information of a model on data (Matena & Raffel 2022, arXiv 2111.09832), saved checkpoint-shaped.

    F = (1/N) sum_n E_y[(d/dtheta log p(y | x_n))^2]

Per example (batch of one, so gradients are per-example and no padding is involved):

- sequence classification, ``exact`` (default, as the official code): the expectation over the
  model's own label distribution, sum_y p(y|x) g_y^2 (one backward pass per class);
  ``sampled``: one y ~ p(.|x); ``empirical``: the gold label.
- causal LM, ``empirical`` (default): g = gradient of the mean log-likelihood of the example's
  gold next tokens; ``sampled``: the next tokens drawn from the model's predictive distribution at
  every position (seeded). The exact expectation over a vocabulary per token is impractical;
  averaging over the tokens of an example (rather than summing) keeps long and short examples on
  one scale. This is an implementation choice, not from a primary source.

The model runs in eval mode (no dropout) and float32. The file holds one float32 tensor per
floating parameter under its checkpoint name (tied output embeddings appear once, as the input
embedding), with metadata: examples, variant, model fingerprint and ``sq_norm`` (sum of squares
of all entries, used by the fisher merge's normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deltawise.adapt.data import IGNORE_INDEX
from deltawise.data.tasks import batches
from deltawise.stats.collect import CollectOptions, CollectRun, finish, start
from deltawise.stats.names import checkpoint_names
from deltawise.errors import InputError

VARIANTS = {"classification": ("exact", "sampled", "empirical"), "causal_lm": ("empirical", "sampled")}


@dataclass
class FisherResult:
    out: Path
    task: str
    variant: str
    examples: int
    tensors: int
    seconds: float


def _variant(task: str, variant: str) -> str:
    if variant == "auto":
        return VARIANTS[task][0]
    if variant not in VARIANTS[task]:
        raise InputError(f"--variant {variant} does not apply to {task} data; choose one of {', '.join(VARIANTS[task])}")
    return variant


def example_log_likelihoods(logits: torch.Tensor, batch: dict, task: str, variant: str,
                            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-likelihoods whose squared gradients are averaged, and their weights.

    Classification: one entry per class (``exact``, weighted by p(y|x)) or the chosen label;
    causal LM: the mean token log-likelihood of the targets, weight 1."""
    if task == "classification":
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        probs = logp.detach().exp()
        if variant == "exact":
            return logp, probs
        if variant == "sampled":
            y = int(torch.multinomial(probs.cpu(), 1, generator=gen))
        else:
            y = int(batch["labels"][0])
        return logp[y : y + 1], torch.ones(1)
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    labels = batch["labels"][0, 1:]
    keep = labels != IGNORE_INDEX
    if variant == "sampled":
        targets = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen)[:, 0].to(labels.device)
    else:
        targets = labels.clamp(min=0)
    ll = logp.gather(1, targets[:, None])[:, 0][keep].mean()
    return ll[None], torch.ones(1)


def diagonal_fisher(model: torch.nn.Module, batches_of_one, task: str, variant: str, *, seed: int = 0, progress=None,
                    total: int = 0) -> dict[str, torch.Tensor]:
    """Per parameter name, the average over examples of the weighted squared gradients."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    for _, p in named:
        p.requires_grad_(True)
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in named}
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for batch in batches_of_one:
        if task == "classification" and variant == "empirical" and int(batch["labels"][0]) < 0:
            raise InputError("the empirical Fisher needs a label for every example")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        values, weights = example_log_likelihoods(logits, batch, task, variant, gen)
        for k in range(values.numel()):
            if float(weights[k]) == 0.0:
                continue
            grads = torch.autograd.grad(values[k], [p for _, p in named], retain_graph=k < values.numel() - 1, allow_unused=True)
            for (n, _), g in zip(named, grads):
                if g is not None:
                    acc[n].add_(g.float().square(), alpha=float(weights[k]))
        count += 1
        if progress is not None:
            progress(count, total)
    if count == 0:
        raise InputError("no examples to compute the Fisher on")
    return {n: a / count for n, a in acc.items()}


def compute_fisher(model: str, data: Path, out: Path, options: CollectOptions, variant: str = "auto") -> FisherResult:
    """``deltawise fisher``: write the diagonal Fisher of MODEL on DATA to OUT (.safetensors)."""
    run: CollectRun = start(model, data, out, options)
    task = run.data.task
    chosen = _variant(task, variant)
    if task == "classification" and chosen == "empirical" and not run.data.labelled:
        raise InputError(f"{data}: the empirical Fisher needs a 'label' on every item")
    names = checkpoint_names(run.lm.model, run.reader)
    fisher = diagonal_fisher(run.lm.model, batches(run.lm, run.rows, task, 1), task, chosen, seed=options.seed,
                             progress=options.progress, total=len(run.rows))
    tensors = {names[n]: f.cpu() for n, f in fisher.items() if n in names}
    sq_norm = float(sum(t.double().square().sum() for t in tensors.values()))
    seconds = finish(run, out, tensors, run.metadata("fisher", variant=chosen, sq_norm=sq_norm, seed=options.seed,
                                                     max_length=options.max_length))
    return FisherResult(out, task, chosen, len(run.rows), len(tensors), seconds)
