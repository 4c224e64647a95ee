"""aTLAS: learn one coefficient per (task vector, parameter tensor) by gradient descent
(Zhang et al. 2024, "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
NeurIPS 2024, arXiv 2407.02880).

    theta(Lambda)_b = theta0_b + sum_t Lambda[t, b] tau_t,b,     tau_t = theta_t - theta0,  Lambda = 0 at start

The network runs functionally (``torch.func.functional_call``) on theta(Lambda); only Lambda
(T x B numbers) trains, with AdamW (lr 1e-3, weight decay 0.1) and gradient-norm clipping at 1.0.
Every step takes one batch from each task's data and sums the task losses:
- ``ce``: cross-entropy on labelled classification data (one head shared by all tasks: the
  models must be sequence classifiers with the same labels; per-task heads are not supported);
- ``lm``: next-token loss on text;
- ``entropy``: entropy of the predictions on unlabelled data (the paper's test-time adaptation).
With validation data, Lambda is evaluated after every epoch (accuracy for labelled classification
data, else minus the loss) and the best one is kept. With test data (never used for training or the
choice) the chosen Lambda and the base are scored on it with ``deltawise eval``'s scoring, and each
task's ratio to the base gets a paired bootstrap interval: the numbers to report. The model is written by the merge engine
as the task-arithmetic merge theta0 + sum_t w_t tau_t with per-tensor weights w = Lambda, and the
coefficients go to ``atlas.json`` inside the output folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from deltawise.adapt.data import IGNORE_INDEX
from deltawise.data.tasks import TaskData, encode, endless_batches, head_for, load_data
from deltawise.stats.names import checkpoint_names
from deltawise.search.scoring import resolve_metric, score_model
from deltawise.errors import InputError
from deltawise.eval.models import LoadedModel, load_model
from deltawise.io.output import check_output_folder
from deltawise.delta.reader import open_model
from deltawise.io.resolve import resolve_model
from deltawise.options import IntervalOptions

OBJECTIVES = ("auto", "ce", "lm", "entropy")


@dataclass
class AtlasOptions:
    objective: str = "auto"
    task: str = "auto"
    epochs: int = 1
    steps: Optional[int] = None  # overrides epochs
    lr: float = 1e-3
    weight_decay: float = 0.1
    clip: float = 1.0
    batch_size: int = 8
    max_length: int = 256
    max_examples: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    overwrite: bool = False
    progress: Optional[Callable[[int, int], None]] = None
    trust_remote_code: bool = False  # run Python code shipped in a model folder (--trust-remote-code)


@dataclass
class AtlasResult:
    base: str
    models: list[str]
    objective: str
    blocks: list[str]  # checkpoint tensor names, one coefficient column each
    coefficients: list[list[float]]  # [task][block]
    history: list[dict] = field(default_factory=list)  # per evaluation: step, train loss, validation score
    best_step: int = 0
    out: Optional[str] = None
    test: Optional[dict] = None  # the chosen coefficients and the base on the test data

    def to_json(self) -> dict:
        return {
            "base": self.base, "models": self.models, "objective": self.objective, "best_step": self.best_step,
            "coefficients": {m: dict(zip(self.blocks, row)) for m, row in zip(self.models, self.coefficients)},
            "history": self.history, "out": self.out, "test": self.test,
        }


class Composer:
    """Holds theta0, the stacked task vectors of each block and Lambda; composes the parameters."""

    def __init__(self, lm: LoadedModel, models: list[str]):
        base_reader = open_model(str(lm.path))
        try:
            self.names = checkpoint_names(lm.model, base_reader)  # parameter name -> checkpoint name
        finally:
            base_reader.close()
        params = dict(lm.model.named_parameters())
        self.blocks = list(self.names)
        self.theta0 = {n: params[n].detach().float().clone() for n in self.blocks}
        taus: dict[str, list[torch.Tensor]] = {n: [] for n in self.blocks}
        for ref in models:
            reader = open_model(ref)  # a model, or a delta or adapter folder on its base
            try:
                for n in self.blocks:
                    ckpt = self.names[n]
                    if ckpt not in reader or tuple(reader.info(ckpt).shape) != tuple(self.theta0[n].shape):
                        raise InputError(f"model {ref!r}: tensor {ckpt!r} is missing or shaped differently from the base's")
                    taus[n].append(reader.get(ckpt).float().to(self.theta0[n].device) - self.theta0[n])
            finally:
                reader.close()
        self.tau = {n: torch.stack(v) for n, v in taus.items()}  # (T, *shape) per block
        device = next(iter(self.theta0.values())).device
        self.lam = torch.zeros(len(models), len(self.blocks), device=device, requires_grad=True)

    def params(self) -> dict[str, torch.Tensor]:
        return {n: self.theta0[n] + torch.tensordot(self.lam[:, b], self.tau[n], dims=1) for b, n in enumerate(self.blocks)}


def objective_loss(logits: torch.Tensor, batch: dict, task: str, objective: str) -> torch.Tensor:
    logits = logits.float()
    if objective == "ce":
        return F.cross_entropy(logits, batch["labels"])
    if objective == "lm":
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    if task == "classification":
        return entropy.mean()
    mask = batch["attention_mask"].float()
    return (entropy * mask).sum() / mask.sum()


def _objective(task: str, objective: str, labelled: bool) -> str:
    if objective not in OBJECTIVES:
        raise InputError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective == "auto":
        return "lm" if task == "causal_lm" else ("ce" if labelled else "entropy")
    if objective == "ce" and (task != "classification" or not labelled):
        raise InputError("--objective ce needs labelled classification data ('text' and 'label')")
    if objective == "lm" and task != "causal_lm":
        raise InputError("--objective lm needs text data and a causal LM")
    return objective


def _per_task(paths: list[Path], n: int, what: str) -> list[Path]:
    if len(paths) == 1:
        return paths * n
    if len(paths) != n:
        raise InputError(f"give one {what} for all tasks or one per model ({n}); got {len(paths)}")
    return paths


def learn(base: str, models: list[str], data: list[Path], options: AtlasOptions, val: Optional[list[Path]] = None,
          ) -> tuple[AtlasResult, Composer, LoadedModel]:
    """Train Lambda; returns the result (best coefficients), the composer and the loaded base."""
    if not models:
        raise InputError("aTLAS needs at least one fine-tuned model besides the base")
    train = [load_data(p, options.task, limit=options.max_examples) for p in _per_task(data, len(models), "--data")]
    task = train[0].task
    if any(d.task != task for d in train):
        raise InputError("all --data sets must be of one task (all labelled classification or all text)")
    objective = _objective(task, options.objective, all(d.labelled for d in train))
    valid = [load_data(p, task) for p in _per_task(val, len(models), "--val")] if val else []
    lm = load_model(base, head_for(task), device=options.device, trust_remote_code=options.trust_remote_code)
    composer = Composer(lm, models)
    rows = [encode(lm, d, options.max_length) for d in train]
    streams = [endless_batches(lm, r, task, options.batch_size, options.seed + i) for i, r in enumerate(rows)]
    per_epoch = max(1, max(math.ceil(len(r) / options.batch_size) for r in rows))
    total = options.steps if options.steps is not None else options.epochs * per_epoch
    optimizer = torch.optim.AdamW([composer.lam], lr=options.lr, weight_decay=options.weight_decay)
    model = lm.model.eval()  # no dropout: the loss is a function of Lambda only
    for p in model.parameters():
        p.requires_grad_(False)
    result = AtlasResult(base, list(models), objective, [composer.names[n] for n in composer.blocks], [])
    best, best_lam = -math.inf, composer.lam.detach().clone()
    losses: list[float] = []
    for step in range(1, total + 1):
        loss = step_loss(model, composer, [next(s) for s in streams], task, objective)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([composer.lam], options.clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if options.progress:
            options.progress(step, total)
        if step % per_epoch == 0 or step == total:
            entry = {"step": step, "train_loss": sum(losses) / len(losses)}  # mean since the last evaluation
            losses = []
            if valid:
                entry["validation"] = validate(lm, composer, valid, options)
                if entry["validation"] > best:
                    best, best_lam, result.best_step = entry["validation"], composer.lam.detach().clone(), step
            result.history.append(entry)
    if not valid:
        best_lam, result.best_step = composer.lam.detach().clone(), total
    result.coefficients = best_lam.cpu().tolist()
    return result, composer, lm


def step_loss(model: torch.nn.Module, composer: Composer, batches: list[dict], task: str, objective: str) -> torch.Tensor:
    """Sum over tasks of each task's batch loss under theta(Lambda)."""
    from torch.func import functional_call

    params = composer.params()
    total = torch.zeros((), device=composer.lam.device)
    for batch in batches:
        logits = functional_call(model, params, (),
                                 {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).logits
        total = total + objective_loss(logits, batch, task, objective)
    return total


@torch.no_grad()
def validate(lm: LoadedModel, composer: Composer, valid: list[TaskData], options: AtlasOptions) -> float:
    """Mean over tasks of the validation score (higher is better) with the current Lambda."""
    params = dict(lm.model.named_parameters())
    composed = composer.params()
    try:
        for n, value in composed.items():
            params[n].copy_(value)
        scores = [score_model(lm, d, resolve_metric(d.task, "auto"), max_length=options.max_length,
                              batch_size=options.batch_size).score for d in valid]
    finally:
        for n, value in composer.theta0.items():
            params[n].copy_(value)
    return sum(scores) / len(scores)


def weight_rules(blocks: list[str], row: list[float]) -> list[dict]:
    """Per-tensor weights as recipe filter rules: exact names, longest first, so that a name that is a
    substring of another never captures it; tensors without a coefficient get 0 (kept at the base)."""
    order = sorted(range(len(blocks)), key=lambda b: -len(blocks[b]))
    return [{"filter": blocks[b], "value": row[b]} for b in order] + [{"value": 0.0}]


@torch.no_grad()
def test_report(lm: LoadedModel, composer: Composer, coefficients: list[list[float]], tests: list[Path],
                options: AtlasOptions, intervals: IntervalOptions) -> dict:
    """The model with ``coefficients`` against the base (Lambda = 0) on each test file: per task the score, the ratio
    to the base and its paired bootstrap interval, with ``deltawise eval``'s scoring."""
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.results import EvalResult
    from deltawise.eval.runner import unique_names
    from deltawise.search.scoring import as_result, score_data

    data = [load_data(p, "auto") for p in tests]
    params = dict(lm.model.named_parameters())

    def scored(label: str, composed: dict[str, torch.Tensor]) -> EvalResult:
        for n, value in composed.items():
            params[n].copy_(value)
        return as_result(label, [score_data(lm, d, name=name, max_length=options.max_length, batch_size=options.batch_size)
                                 for name, d in zip(unique_names(list(tests)), data)])

    chosen_lam = torch.tensor(coefficients, dtype=composer.lam.dtype, device=composer.lam.device)
    composed = {n: composer.theta0[n] + torch.tensordot(chosen_lam[:, b], composer.tau[n], dims=1)
                for b, n in enumerate(composer.blocks)}
    merged = scored("atlas", composed)
    base = scored("base", composer.theta0)  # also puts the base weights back
    comparison = forgetting(merged, base, intervals)
    return {"tasks": {c.name: {"data": d.path.as_posix(), "items": len(d.items), "metric": c.metric, "base": c.base,
                               "atlas": c.model, "ratio": c.ratio, "ratio_ci": c.ratio_ci}
                      for c, d in zip(comparison.datasets, data)},
            "mean_ratio": comparison.target_gain + 1.0, "mean_ratio_ci": None if comparison.target_gain_ci is None
            else [v + 1.0 for v in comparison.target_gain_ci], "intervals": intervals.describe()}


def run_atlas(base: str, models: list[str], data: list[Path], out: Path, options: AtlasOptions,
              val: Optional[list[Path]] = None, test: Optional[list[Path]] = None,
              intervals: Optional[IntervalOptions] = None) -> AtlasResult:
    from deltawise.merge import MergeOptions, build_plan, parse_recipe, run_merge

    refs = [base, *models]
    check_output_folder(out, [(m, resolve_model(m)) for m in refs], options.overwrite)
    overlap = {Path(p).resolve() for p in test or []} & {Path(p).resolve() for p in [*data, *(val or [])]}
    if overlap:
        raise InputError(f"{sorted(map(str, overlap))[0]} is both test data and training or validation data: "
                         "the test report would not be out of sample")
    result, composer, lm = learn(base, models, data, options, val)
    if test:
        result.test = test_report(lm, composer, result.coefficients, test, options, intervals or IntervalOptions())
    recipe = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": base,
        "models": [{"model": m, "parameters": {"weight": weight_rules(result.blocks, row)}}
                   for m, row in zip(models, result.coefficients)],
    }, "aTLAS")
    result.out = str(out)
    run_merge(build_plan(recipe), out, MergeOptions(device=options.device, threads=options.threads, overwrite=options.overwrite,
                                                    extra_files={"atlas.json": json.dumps(result.to_json(), indent=2) + "\n"}))
    return result
