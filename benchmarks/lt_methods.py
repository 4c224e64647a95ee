"""The runs of the long language-transfer benchmark (language_transfer_long.py): data, methods, training,
and the retention-budget merge with the base. Each stage caches its output in the run's folder.

Method settings (``METHODS``):
* full, full-replay: all weights; full-replay mixes 25% English text into every batch.
* lora: rank 16, alpha 32, on every linear layer of the blocks (the QLoRA/continual-pretraining
  practice), at the ~10x rate adapters take.
* hft: half of each layer's matrices frozen at random (the paper's 50%).
* lift: the paper-like ranks r_L = r_f = 128 and mask refresh every K = 400 steps (its defaults in
  deltawise are 8/8/100; the paper uses 128, 32-128 and 400).
* sorsa: rank 128 as in the paper's experiments, gamma 4e-4 (the official default).
* bam-slerp, bam-linear: Branch-and-Merge as its paper runs it, with 25% English replay: 2 branches
  per round on disjoint slices of the German data, ``--bam-rounds`` rounds, every branch full
  fine-tuning for steps/(2·rounds) steps, so the total step count equals every other run's.
  Schedule: per branch -- each branch is its own ``train`` run, so warm-up (10%) and cosine decay
  restart in every branch (deltawise bam's behaviour; docs/adapt.md). Merges: SLERP t = 0.5 and the
  linear average.
* english-only (control): full fine-tuning on English Debian fortunes only (``english_fortunes``: the German
  runs' genre in the source language, about 12k texts, so 400 steps see a quarter of them once), same steps and
  rate: if it also lifts English prose retention above 1, "retention > 1" of the other runs is adaptation of the
  Q4_1-dequantised base to plain English text (quantisation repair), not transfer. (Its first form trained on the
  657 replay texts, about five passes in 400 steps, and overfitted them: RESULTS.md.)
* full-guard, full-repair, full-lr-sweep: full fine-tuning with the forgetting-budget tools (``tool``;
  lt_budget.py runs them): guarded at the usual rate and at the top of full's sweep, the unguarded run at
  the top rate repaired, and the rate the learning-rate search recommends.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import realtext
from bench_args import same_rate
import wordnet_mc
from language_transfer import console, write_jsonl

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
REPLAY_FRACTION = 0.25
# the English files of Debian's fortunes and fortunes-min packages (their folder also holds fortunes-it's files;
# pictures and the multilingual translate-me are left out)
ENGLISH_FORTUNES = ("computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education", "ethnic", "food",
                    "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie", "love", "magic", "medicine",
                    "men-women", "miscellaneous", "news", "paradoxum", "people", "perl", "pets", "platitudes", "politics",
                    "pratchett", "science", "songs-poems", "sports", "startrek", "tao", "wisdom", "work", "zippy",
                    "fortunes", "literature", "riddles")
FULL_LRS = (3e-5, 1e-4, 3e-4)  # the rates of full fine-tuning a user would try; the top one forgets most
# Full fine-tuning's front is the reference every method is read against at matched gain, and the comparisons fall
# between its gains at 3e-5 and 1e-4 (+2.8 to +3.6): 6e-5 puts a point there, so that a bend of the front between
# them shows instead of being drawn as a straight line, and 4.5e-5 one just below LIFT's gain (+3.15), so that LIFT's
# comparison reads a short segment between two measured points (the rate was chosen from gains only, never retention).
FULL_FRONT = (3e-5, 4.5e-5, 6e-5, 1e-4, 3e-4)


@dataclass(frozen=True)
class Method:
    label: str
    method: str
    lrs: tuple[float, ...]  # the sweep
    usual: float  # the main row's rate (all seeds, budget merge)
    params: tuple[tuple[str, Any], ...] = ()
    replay: bool = False
    english_only: bool = False
    bam: Optional[str] = None  # the merge of each BaM round
    tool: Optional[str] = None  # a forgetting-budget row (lt_budget.py): "guard", "repair" or "lr-sweep"
    refine: int = 0  # a guard row's --interpolate-refine rounds


METHODS = [
    Method("full", "full", FULL_FRONT, 1e-4),
    Method("full-replay", "full", FULL_LRS, 1e-4, replay=True),
    Method("lora", "lora", (5e-4, 2e-3, 5e-3), 2e-3, (("rank", 16), ("alpha", 32.0), ("targets", ALL_LINEAR))),
    Method("hft", "hft", FULL_LRS, 1e-4),
    Method("lift", "lift", (5e-5, 2e-4, 5e-4), 2e-4, (("rank", 128), ("filter_rank", 128), ("refresh_interval", 400))),
    Method("sorsa", "sorsa", (1e-5, 3e-5, 1e-4), 3e-5, (("rank", 128),)),
    Method("bam-slerp", "full", FULL_LRS, 1e-4, replay=True, bam="slerp"),
    Method("bam-linear", "full", FULL_LRS, 1e-4, replay=True, bam="linear"),
    Method("english-only", "full", (1e-4,), 1e-4, english_only=True),
    Method("full-guard", "full", (1e-4, FULL_LRS[-1]), 1e-4, tool="guard"),
    # at 3e-4 the 0.2-step λ grid decides between 0.4 and 0.6 (69-74% or 93% of the gain, by seed): two rounds of midpoints
    Method("full-guard-refine", "full", (FULL_LRS[-1],), 1e-4, tool="guard", refine=2),
    Method("full-repair", "full", (FULL_LRS[-1],), 1e-4, tool="repair"),
    Method("full-lr-sweep", "full", FULL_LRS, 1e-4, tool="lr-sweep"),  # lrs: the rates the search tries
]
FULL = METHODS[0]
LABELS = [m.label for m in METHODS]


@dataclass(frozen=True)
class Run:
    method: Method
    lr: Optional[float]  # None: chosen by the run itself (the learning-rate search)
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method.label}_s{self.seed}" if self.lr is None else f"{self.method.label}_lr{self.lr:g}_s{self.seed}"

    @property
    def budget(self) -> bool:
        """Runs at the usual rate are followed by a retention-budget merge with the base (not the
        English-only control: it has no German gain to keep; not the forgetting-budget rows: they have a budget)."""
        return self.lr == self.method.usual and not self.method.english_only and not self.method.tool


def select(labels: str) -> list[Method]:
    if labels == "all":
        return list(METHODS)
    by_label = {m.label: m for m in METHODS}
    unknown = [x for x in labels.split(",") if x not in by_label]
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)} (have {', '.join(by_label)})")
    return [by_label[x] for x in labels.split(",")]


def plan(methods: list[Method], seeds: list[int], sweep_seeds: list[int], lrs: Optional[list[float]] = None) -> list[Run]:
    """``seeds`` at a method's usual rate, ``sweep_seeds`` at its other rates; the learning-rate search, whose rate is
    its own choice, runs once per seed of ``seeds`` (a method's main row). ``lrs`` keeps only the runs at those rates
    (the search, which has none, is left out); a rate that no method of ``methods`` sweeps is an error."""
    runs = [Run(m, lr, s) for m in methods
            for lr, seeds_here in ([(None, seeds)] if m.tool == "lr-sweep" else
                                   [(lr, seeds if lr == m.usual else sweep_seeds) for lr in m.lrs])
            for s in seeds_here]
    if lrs is None:
        return runs
    swept = sorted({lr for m in methods if m.tool != "lr-sweep" for lr in m.lrs})
    unknown = [lr for lr in lrs if not any(same_rate(lr, x) for x in swept)]
    if unknown:
        raise SystemExit(f"--lrs {', '.join(f'{x:g}' for x in unknown)}: not a rate of "
                         f"{', '.join(m.label for m in methods)} (their rates: {', '.join(f'{x:g}' for x in swept)})")
    return [r for r in runs if r.lr is not None and any(same_rate(r.lr, x) for x in lrs)]


@dataclass(frozen=True)
class Data:
    folder: Path

    def __getattr__(self, name: str) -> Path:
        files = {"german_eval": "eval/german.jsonl", "prose_eval": "eval/english_prose.jsonl", "mc": "eval/wordnet_mc.jsonl",
                 "german_select": "select/german.jsonl", "prose_select": "select/english_prose.jsonl",
                 "german_train": "train/german.txt", "english_train": "train/english.txt",
                 "english_fortunes": "train/english_fortunes.txt"}
        if name not in files:
            raise AttributeError(name)
        return self.folder / files[name]

    def files(self) -> list[Path]:
        return [getattr(self, n) for n in ("german_eval", "prose_eval", "mc", "german_select", "prose_select",
                                           "german_train", "english_train")]

    def counts(self) -> dict[str, int]:
        from deltawise.data.read import split_documents

        return {f.parent.name + "/" + f.name: (sum(1 for _ in f.open(encoding="utf-8")) if f.suffix == ".jsonl"
                                               else len(split_documents(f.read_text(encoding="utf-8")))) for f in self.files()}


def eval_options(args):
    """How every model of the benchmark is scored (and how the budget tools score theirs)."""
    from deltawise.eval.runner import EvalOptions

    return EvalOptions(max_length=256, batch_size=args.eval_batch_size, mc_norm="byte", device=args.device)


def prepare_data(folder: Path, n_eval: int, n_select: int, n_mc: int, seed: int) -> Data:
    """The seeded sets (written once; a rerun reuses them, so cached results stay comparable)."""
    data = Data(folder)
    asked = {"eval": n_eval, "select": n_select, "mc": n_mc, "seed": seed}
    sizes = folder / "sizes.json"
    if all(f.is_file() for f in data.files()) and sizes.is_file():
        if json.loads(sizes.read_text()) != asked:  # cached results were measured on the sets as first drawn
            raise SystemExit(f"{folder} holds sets drawn with {sizes.read_text()}, not {asked}: use another --work")
        return data
    from pydoc_data.topics import topics

    realtext.ensure_fortunes(["fortunes-de"])
    rng = random.Random(seed)
    german = realtext.fortunes(realtext.FORTUNES / "de", min_chars=40, max_chars=400)
    prose = realtext.english_prose()
    rng.shuffle(german)
    rng.shuffle(prose)
    if len(prose) < n_eval + n_select or len(german) < n_eval + n_select + 1000:
        raise SystemExit(f"not enough text: {len(prose)} English prose paragraphs and {len(german)} German fortunes "
                         f"for {n_eval} evaluation + {n_select} selection items per set")
    held = set(prose[: n_eval + n_select])
    # the Python language reference: English prose of the same register, none of it in a held-out set
    reference = [p for p in realtext._paragraphs("\n\n".join(topics.values()), 200, 700) if p not in held]
    for sub in ("eval", "select", "train"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    write_jsonl(data.german_eval, german[:n_eval])
    write_jsonl(data.german_select, german[n_eval: n_eval + n_select])
    data.german_train.write_text("\n%\n".join(german[n_eval + n_select:]) + "\n", encoding="utf-8")
    write_jsonl(data.prose_eval, prose[:n_eval])
    write_jsonl(data.prose_select, prose[n_eval: n_eval + n_select])
    data.english_train.write_text("\n%\n".join(prose[n_eval + n_select:] + reference) + "\n", encoding="utf-8")
    wordnet_mc.write_items(data.mc, wordnet_mc.build_items(n_items=n_mc, seed=seed))
    sizes.write_text(json.dumps(asked))
    return data


def english_fortunes(data: Data, seed: int = 0) -> Path:
    """The English-only control's training text (``data.english_fortunes``), drawn once: every English Debian fortune
    of 40-400 characters (the German sets' bounds), deduplicated and shuffled with ``seed``. Kept out of the sets'
    fingerprint (lt_records.data_fingerprint), so adding it changed no other record; the control's record carries
    its sha256 instead (lt_records.run_settings)."""
    path = data.english_fortunes
    if path.is_file():
        return path
    from deltawise.io.writer import write_text_atomic

    realtext.ensure_fortunes(["fortunes"])
    texts = list(dict.fromkeys(t for name in ENGLISH_FORTUNES
                               for t in realtext.fortunes(realtext.FORTUNES / name, min_chars=40, max_chars=400)))
    random.Random(seed).shuffle(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n%\n".join(texts) + "\n")
    return path


def trained(run: Run, folder: Path) -> bool:
    if run.method.bam:
        return (folder / "model" / "bam.json").is_file()
    return (folder / "train" / "deltawise_train.json").is_file()


def settings(run: Run, base: Path, data: Data, args) -> dict[str, Any]:
    """The ``TrainConfig`` fields every run shares (the budget rows' short lr-sweep runs take them too)."""
    m = run.method
    return dict(model=base, data=data.english_fortunes if m.english_only else data.german_train, lr=run.lr,
                batch_size=args.batch_size, max_length=args.max_length, warmup=0.1, schedule="cosine", seed=run.seed,
                replay=data.english_train if m.replay else None, replay_fraction=REPLAY_FRACTION, progress=console.is_terminal,
                overwrite=True)


def train_config(run: Run, base: Path, data: Data, output: Path, args):
    """One training run of ``args.steps`` steps into ``output``, keeping ``args.checkpoints`` checkpoints along it (a
    tenth apart by default): a killed run continues from its last one when rerun, and a guarded run killed in its
    searches after training runs them again without retraining. Checkpoints change no result."""
    from deltawise.adapt.checkpoints import interrupted_checkpoint
    from deltawise.adapt.guard_searches import interrupted_searches
    from deltawise.adapt.train import TrainConfig

    every = max(1, args.steps // 10)
    save_every = max(1, args.steps // args.checkpoints) if args.checkpoints else 0
    return TrainConfig(**settings(run, base, data, args), output=output, method=run.method.method, max_steps=args.steps,
                       logging_steps=every, method_params=dict(run.method.params), save_every=save_every,
                       resume=interrupted_checkpoint(output) is not None or interrupted_searches(output))


class NotComputed(RuntimeError):
    """A stage would compute where this invocation may not: ``--recorded-only``, or a GPU this machine lacks."""


def require_compute(args) -> None:
    """Refuses to compute under ``--recorded-only``, and where ``--device`` is absent: transformers would train on the
    CPU instead, and a CPU result would be recorded as the GPU's (the records of each kind of device are kept apart:
    lt_records.device_kind)."""
    if args.recorded_only:
        raise NotComputed("not recorded (--recorded-only)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise NotComputed(f"not recorded, and {args.device} is not on this machine")


def train(run: Run, base: Path, data: Data, folder: Path, args) -> tuple[Path, Optional[float]]:
    """The run's full model (trained now unless cached) and the seconds training took now (None: cached)."""
    from deltawise.adapt.materialize import materialize
    from deltawise.adapt.train import TrainConfig, run_train

    require_compute(args)
    m = run.method
    common = settings(run, base, data, args)
    seconds = None
    if m.bam:
        from deltawise.adapt.bam import BamConfig, run_bam

        model = folder / "model"
        if not trained(run, folder):
            per_branch = max(1, args.steps // (2 * args.bam_rounds))
            if per_branch < 10:  # each branch warms up from lr 0 over its first 10%: a few steps barely move it
                console.print(f"    [yellow]bam: {per_branch} steps per branch; with warm-up restarting in each branch "
                              "they train little (fewer --bam-rounds or more --steps)[/]")
            cfg = TrainConfig(**common, output=model, method="full", max_steps=per_branch, logging_steps=max(1, per_branch // 5))
            t0 = time.time()
            run_bam(BamConfig(train=cfg, branches=2, rounds=args.bam_rounds, merge=m.bam, work=folder / "bam-work"),
                    note=lambda message: console.print(f"    bam: {message}"))
            seconds = time.time() - t0
        return model, seconds
    if not trained(run, folder):
        cfg = train_config(run, base, data, folder / "train", args)
        t0 = time.time()
        run_train(cfg)
        seconds = time.time() - t0
    model = folder / "model"
    if (model / "config.json").is_file():
        return model, seconds
    return materialize(folder / "train", base, model), seconds  # a full fine-tune: the train folder itself


def budget_merge(model: Path, base: Path, data: Data, folder: Path, args) -> dict:
    """task_arithmetic of the run with the base, lambda searched (0.2 ... 1.0, one refinement round):
    selected on the selection sets (prose retention's lower bound >= ``--budget``), reported on the
    evaluation sets every other number of the benchmark is measured on."""
    out_json = folder / "budget.json"
    if out_json.is_file():
        return json.loads(out_json.read_text())
    require_compute(args)
    from deltawise.io.writer import write_json_atomic
    from deltawise.merge.engine import MergeOptions
    from deltawise.merge.recipe import parse_recipe
    from deltawise.search.budget import BudgetOptions, RetentionBudget, run_budget

    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(model)}],
                           "out_dtype": "float32"})
    options = BudgetOptions(retain=[RetentionBudget(data.prose_select, args.budget)], targets=[data.german_select], refine=1,
                            most_retentive=True, eval=eval_options(args), merge=MergeOptions(device=args.device, overwrite=True),
                            heldout_retain=[data.prose_eval], heldout_targets=[data.german_eval],
                            note=lambda message: console.print(f"    budget: {message}"))
    out = folder / "budget-model"
    try:
        result = run_budget(recipe, out, options)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the chosen merge is rebuilt from its lambda when wanted
    record = json.loads(json.dumps(result.to_json(), default=str))
    write_json_atomic(out_json, record)
    return record


def prune(folder: Path) -> None:
    """Drops what can be rebuilt once a run is evaluated (and merged): the adapter's folded-in model
    and BaM's branch models. Full fine-tunes and BaM outputs stay (they are the trained result)."""
    if not (folder / "eval.json").is_file():
        return
    if (folder / "train").is_dir() and (folder / "model").is_dir():
        shutil.rmtree(folder / "model")
    if (folder / "model" / "bam.json").is_file():
        shutil.rmtree(folder / "bam-work", ignore_errors=True)
