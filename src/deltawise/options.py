"""Command-line option groups, each declared once, and ``key=value`` option parsing.

A group is a dataclass whose fields carry everything the command line needs: default, help, flag
names, short flag, range, visibility (``Flag`` in the field's metadata).
``deltawise.commands.flags.options`` turns a group into typer parameters and hands the command an
instance; library code takes the same instances (``TrainConfig`` extends ``TrainingOptions``), so
a default lives in exactly one place. Shape borrowed from mergekit's
``MergeOptions`` + ``add_merge_options`` and litgpt's ``args.py`` groups.

Naming rules of the command line (README "Command-line conventions"): ``-o/--output`` for what a
command writes, ``-q/--quiet``, ``-m/--method``, ``-p/--method-param`` for a training method's
parameters; ``--task`` defaults to ``auto`` everywhere (classification when the data's records carry
a ``label``, else causal LM).

This module imports neither torch nor typer: the library and the CLI both read it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import yaml

from deltawise.errors import InputError

TASK_HELP = "auto (classification when the data's records carry 'label', else causal_lm), classification or causal_lm"


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line."""

    help: str
    short: Optional[str] = None  # e.g. "-o"
    long: Optional[str] = None  # default: --field-name
    min: Optional[float] = None
    max: Optional[float] = None
    required: bool = False
    hidden: bool = False
    metavar: Optional[str] = None

    def long_name(self, field_name: str) -> str:
        return self.long or "--" + field_name.replace("_", "-")


def option(default: Any = None, help: str = "", *, factory: Any = None, **flag: Any) -> Any:
    """A dataclass field that is also a command-line option (``flag``: the ``Flag`` attributes)."""
    meta = {"flag": Flag(help=help, **flag)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> Flag:
    """The ``Flag`` of a dataclass field; a field without one is not a command-line option."""
    return f.metadata["flag"]


def option_fields(cls: type) -> list:
    """The fields of a group that are command-line options, in declaration order."""
    return [f for f in fields(cls) if "flag" in f.metadata]


def default_of(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


@dataclass
class RunOptions:
    """Where a command writes, and how it talks while it works."""

    output: Optional[Path] = option(None, "where the result is written", short="-o", required=True)
    overwrite: bool = option(False, "replace a non-empty output once the new one is complete")
    quiet: bool = option(False, "no progress bars or messages", short="-q")
    device: str = option("cpu", "where the arithmetic runs: cpu or cuda")


@dataclass
class LoadOptions:
    """What loading a model folder through transformers may do (docs/safety.md, "Inputs")."""

    trust_remote_code: bool = option(False, "run the Python code a model folder ships (config auto_map: modeling_*.py, "
                                            "tokenization_*.py) for an architecture transformers lacks; read it first")


@dataclass
class BatchOptions:
    """How text is cut into token windows and batched: shared by the data and the training groups."""

    max_length: Optional[int] = option(256, "truncate examples to this many tokens", min=2)
    batch_size: int = option(8, "examples per forward pass (training: per device per step)", min=1)


@dataclass
class DataOptions(BatchOptions):
    """Which examples a data-driven command reads and as what task."""

    task: str = option("auto", TASK_HELP)
    max_examples: Optional[int] = option(None, "use the first N examples", min=1)


@dataclass(frozen=True)
class IntervalOptions:
    """Paired bootstrap confidence intervals of every comparison against a baseline (eval/intervals.py)."""

    level: float = option(0.95, "two-sided confidence level of every interval", long="--confidence", min=0.5, max=0.999)
    replicates: int = option(2000, "bootstrap replicates per interval", long="--bootstrap-replicates", min=100)
    bootstrap_seed: int = option(0, "seed of the bootstrap draws (same seed, same intervals)")

    def __post_init__(self) -> None:
        if not 0.5 <= self.level < 1.0:
            raise InputError(f"confidence level must be in [0.5, 1), got {self.level}")
        if self.replicates < 100:
            raise InputError(f"the bootstrap needs at least 100 replicates, got {self.replicates}")

    def describe(self) -> dict[str, object]:
        return {"method": "paired percentile bootstrap over items", "level": self.level,
                "replicates": self.replicates, "seed": self.bootstrap_seed}


SCHEDULES = ("linear", "cosine", "constant", "cpt")


@dataclass
class TrainingOptions(BatchOptions):
    """The optimisation settings of one training run (``train``, and each branch of ``bam``)."""

    epochs: float = option(1.0, "passes over the data (ignored when --max-steps > 0)")
    max_steps: int = option(-1, "optimizer steps; overrides --epochs when > 0")
    lr: float = option(2e-4, "peak learning rate", min=0)
    grad_accum: int = option(1, "gradient accumulation steps", min=1)
    seed: int = option(0, "random seed (init, data order, random bases and selections)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", min=0)
    schedule: str = option("linear", "LR schedule: linear, cosine, constant, or cpt (re-warm + cosine to --min-lr-ratio)")
    warmup: float = option(0.0, "warmup: fraction of steps (< 1) or number of steps", min=0)
    min_lr_ratio: float = option(0.1, "cpt schedule: final lr as a fraction of --lr", min=0, max=1)
    replay: Optional[Path] = option(None, "source-domain data mixed into every batch (continual pre-training)")
    replay_fraction: float = option(0.25, "share of each batch taken from --replay", min=0, max=1)
    device: str = option("auto", "where training runs: auto (the accelerator when there is one), cpu, cuda or cuda:N")
    dtype: str = option("float32", "compute dtype: float32, or bfloat16 / float16 mixed precision (float32 master "
                                   "weights; float16 needs a GPU)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, one more "
                                                 "forward pass of compute")
    eval_data: Optional[Path] = option(None, "held-out data (same formats as --data): evaluation loss and perplexity "
                                       "(accuracy for classification) logged to training_log.json")
    eval_every: int = option(0, "evaluate on --eval-data every N optimizer steps (0: once, at the end)", min=0)


@dataclass
class CheckpointOptions:
    """Checkpoints of one ``train`` run, kept beside the output until it succeeds, and resuming from them
    (docs/adapt.md, "Resuming")."""

    save_every: int = option(0, "keep a checkpoint every N optimizer steps beside OUTPUT, for --resume (0: none)", min=0)
    resume: bool = option(False, "continue an interrupted run of the same command (as many processes) from its last "
                                 "checkpoint; with --retain --interpolate, after training: run the searches again")


# The training methods' former flags, each now one NAME of --method-param NAME=VALUE.
LEGACY_METHOD_FLAGS = ("rank", "alpha", "dropout", "targets", "init", "n_frequency", "scaling", "filter_rank",
                       "refresh_interval", "ratio", "gamma", "beta")


@dataclass
class MethodChoice:
    """The training method and its parameters; the hidden fields are the old per-parameter flags,
    which feed the same NAME=VALUE dictionary (``method_params``)."""

    method: str = option("lora", "training method: lora, dora, pissa, corda, lora_fa, fourierft, miss/bone, randlora, osf, full, "
                                 "hft, lift, sorsa, loldu, kasa (`deltawise methods --kind adapter`)", short="-m")
    method_param: list[str] = option(factory=list, help="method parameter NAME=VALUE (repeatable), e.g. -p rank=16 -p "
                                     "targets=q_proj,v_proj; `deltawise methods --kind adapter` lists them", short="-p")
    rank: Optional[int] = option(None, "deprecated: -p rank=N", hidden=True, short="-r")
    alpha: Optional[float] = option(None, "deprecated: -p alpha=X", hidden=True)
    dropout: Optional[float] = option(None, "deprecated: -p dropout=X", hidden=True)
    targets: Optional[str] = option(None, "deprecated: -p targets=a,b", hidden=True)
    init: Optional[str] = option(None, "deprecated: -p init=NAME", hidden=True)
    n_frequency: Optional[int] = option(None, "deprecated: -p n_frequency=N", hidden=True)
    scaling: Optional[float] = option(None, "deprecated: -p scaling=X", hidden=True)
    filter_rank: Optional[int] = option(None, "deprecated: -p filter_rank=N", hidden=True)
    refresh_interval: Optional[int] = option(None, "deprecated: -p refresh_interval=N", hidden=True)
    ratio: Optional[float] = option(None, "deprecated: -p ratio=X", hidden=True)
    gamma: Optional[float] = option(None, "deprecated: -p gamma=X", hidden=True)
    beta: Optional[float] = option(None, "deprecated: -p beta=X", hidden=True)
    method_option: list[str] = option(factory=list, help="deprecated: -p NAME=VALUE", hidden=True)

    def params(self) -> dict[str, Any]:
        """NAME -> value from ``--method-param`` and the old flags; a name given twice is an error.
        Values of ``-p`` stay strings: the method's typed parameters parse them."""
        given = parse_assignments(self.method_param, "--method-param")
        sources = {name: "--method-param" for name in given}
        legacy = {name: getattr(self, name) for name in LEGACY_METHOD_FLAGS if getattr(self, name) is not None}
        legacy.update(parse_assignments(self.method_option, "--method-option"))
        for name, value in legacy.items():
            if name in given:
                raise InputError(f"method parameter {name} is given twice ({sources[name]} and an old flag)")
            given[name] = value
            sources[name] = "an old flag"
        return given

    def used_legacy_flags(self) -> list[str]:
        """The deprecated spellings this command line used, for a warning."""
        used = [f"--{name.replace('_', '-')}" for name in LEGACY_METHOD_FLAGS if getattr(self, name) is not None]
        return used + (["--method-option"] if self.method_option else [])


@dataclass
class EngineOptions:
    """How the streaming merge engine reads and writes."""

    threads: int = option(2, "worker threads reading and merging tensors", min=1)
    shard_size: str = option("5GB", "largest output shard, e.g. 5GB, 500MB, 2GiB")
    allow_pickle: bool = option(False, "accept .bin/.pt inputs (loaded with weights_only=True)")
    strict: bool = option(False, "treat every recipe warning as an error (an ignored parameter, a cut vocabulary, ...)")


OUTPUT_FORMATS = ("model", "adapter")


@dataclass
class AdapterOutputOptions:
    """What ``merge`` writes: a full model, or a PEFT LoRA adapter of the inputs' base (docs/merging.md,
    "Adapter output"). The recipe's ``adapter:`` key says the same; the two must agree."""

    output_format: Optional[str] = option(None, "model or adapter (a PEFT LoRA adapter of the inputs' one base: each input "
                                                "an adapter or delta of it, or, with base_model, a full model); default: "
                                                "adapter when the recipe has an adapter: key, else model", metavar="FORMAT")
    adapter_rank: Optional[int] = option(None, "adapter output: rank per matrix where the merge is not an exact sum of "
                                               "LoRA factors (SVD of the merged delta); caps the exact sums too", min=1)
    adapter_energy: Optional[float] = option(None, "adapter output: keep the fewest singular values holding this fraction "
                                                   "of each merged delta's squared norm (with --adapter-rank: the smaller)",
                                             min=0.0, max=1.0)
    adapter_embeddings: Optional[str] = option(None, "adapter output: changed embedding tables (token, position, "
                                                     "token-type) saved whole (exact, modules_to_save; the default) or "
                                                     "as PEFT LoRA-embedding factors by SVD at the rank/energy of the "
                                                     "linear weights (lora: much smaller for a full fine-tune)",
                                               metavar="whole|lora")

    def __post_init__(self) -> None:
        if self.output_format is not None and self.output_format not in OUTPUT_FORMATS:
            raise InputError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}")
        if self.adapter_energy is not None and not 0 < self.adapter_energy <= 1:
            raise InputError(f"--adapter-energy is a fraction in (0, 1], got {self.adapter_energy}")
        check_embedding_format(self.adapter_embeddings)
        if self.output_format == "model" and self.shapes_adapter:
            raise InputError("--adapter-rank/--adapter-energy/--adapter-embeddings shape an adapter output; drop them or "
                             "use --output-format adapter")

    @property
    def shapes_adapter(self) -> bool:
        """Whether an option that only an adapter output reads was given."""
        return self.adapter_rank is not None or self.adapter_energy is not None or self.adapter_embeddings is not None


EmbeddingFormat = Literal["whole", "lora"]  # the recipe's adapter.embeddings is validated against the same values
EMBEDDING_FORMATS: tuple[str, ...] = get_args(EmbeddingFormat)


def check_embedding_format(value: Optional[str]) -> Optional[str]:
    """``--adapter-embeddings`` (and the recipe's ``adapter.embeddings``): whole or lora, None for the default."""
    if value is not None and value not in EMBEDDING_FORMATS:
        raise InputError(f"--adapter-embeddings must be one of {', '.join(EMBEDDING_FORMATS)}, got {value!r}")
    return value


@dataclass
class SplitOptions:
    """Choose on one split of the data, report on another (search/splits.py): a seeded cut by item."""

    heldout_fraction: float = option(0.5, "share of the search data's items held out: the search chooses on the rest "
                                     "and reports its choice on these", min=0.0, max=0.95)
    split_seed: int = option(0, "seed of the selection/held-out cut")


@dataclass
class BudgetSearchOptions:
    """Retention-budget merging (docs/merging.md): search the method's parameters for the best target
    score that keeps every source's retention above its minimum."""

    retain: list[str] = option(factory=list, help="retention budget SOURCE:MIN (e.g. en.jsonl:0.98; repeatable): keep "
                               "SOURCE's retention >= MIN")
    target: list[Path] = option(factory=list, help="data whose score the search maximises (repeatable)")
    search_param: list[str] = option(factory=list, help="NAME=v1,v2,... values to try (repeatable; default: lambda or t "
                                     "at 0.2,0.4,...,1.0)")
    refine: int = option(0, "successive refinement rounds (midpoints around the best feasible value)", min=0)
    most_retentive: bool = option(False, "when no point meets the budget, write the most retentive one instead of nothing")
    baseline: Optional[str] = option(None, "the model retention is measured against (default: base_model)")
    report: Optional[Path] = option(None, "write the search (every point, Pareto front, choice) as JSON here "
                                    "(default: OUTPUT/deltawise_budget.json)")
    heldout_retain: list[Path] = option(factory=list, help="held-out file for the --retain of the same position "
                                        "(repeatable; instead of cutting the --retain files)")
    heldout_target: list[Path] = option(factory=list, help="held-out file for the --target of the same position (repeatable)")
    eval_max_length: Optional[int] = option(None, "tokens per evaluation window", min=2)
    eval_batch_size: int = option(8, "sequences per evaluation forward pass", min=1)

    @property
    def requested(self) -> bool:
        return bool(self.retain or self.target or self.search_param)


@dataclass
class RepairSearchOptions:
    """The edits ``deltawise repair`` tries on a delta (search/repair.py): comma-separated values in [0, 1]."""

    scales: str = option("0.25,0.5,0.75,1", "global scales of the delta to try")
    intruder_levels: str = option("0.5,1", "how much of the delta's component along intruder dimensions to remove (1: all)")
    group_scales: str = option("0,0.5,1", "factors to try per tensor group (embeddings, attention/MLP of early/late layers, "
                               "other)")
    rounds: int = option(1, "passes of the coordinate search over all edits", min=1)
    intruder_k: int = option(10, "top singular vectors of each fine-tuned matrix checked for intruders", min=1)
    intruder_eps: float = option(0.5, "a singular vector is an intruder when its largest |cos| with the base's is below this",
                                 min=0.0, max=1.0)

    @staticmethod
    def values(text: str, flag: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise InputError(f"{flag} takes comma-separated numbers, e.g. 0.25,0.5,1; got {text!r}") from None


EXECUTOR_CHOICES = ("auto", "inline", "local", "ray")


@dataclass
class ExecutorOptions:
    """Where independent jobs run (adapt/executors.py): BaM's branches of a round, lr-sweep's runs, the budget
    search's candidates (docs/adapt.md, "Running branches on a cluster"). A local process gets its share of
    this machine's CPU threads; a Ray task the CPUs it asks for."""

    executor: str = option("auto", "where the jobs run: inline (this process, one after another), local (--jobs "
                                   "processes on this machine), ray (Ray tasks; pip install 'deltawise[ray]'), or auto "
                                   "(local when --jobs is not 1, else inline)")
    jobs: int = option(1, "local executor: jobs run at once, each in its own process (0: all of them)", min=0)
    job_cpus: float = option(1.0, "ray executor: CPUs each job asks for", min=0)
    job_gpus: float = option(0.0, "ray executor: GPUs each job asks for (1: a GPU per job)", min=0)
    # only bam's branches can span several processes: the other commands leave this field out of their flags
    job_workers: int = option(1, "ray executor: processes each job trains on, as one DDP run through Ray Train's "
                                 "TorchTrainer (--job-cpus/--job-gpus are then per process)", min=1)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTOR_CHOICES:
            raise InputError(f"unknown --executor {self.executor!r}; choose one of {', '.join(EXECUTOR_CHOICES)}")
        if self.jobs < 0:
            raise InputError(f"--jobs must be at least 0 (0: all jobs at once), got {self.jobs}")
        if self.job_workers < 1:
            raise InputError(f"a job needs at least 1 worker, got {self.job_workers}")

    @property
    def name(self) -> str:
        """The executor that runs: ``auto`` resolved by ``jobs``."""
        if self.executor == "auto":
            return "inline" if self.jobs == 1 else "local"
        return self.executor


# bam's spelling of the group: the defaults and flag names it had before the group was shared
BAM_EXECUTOR = {"executor": {"default": "inline", "help": "where a round's branches train: inline (this process, one after "
                             "another), local (processes on this machine) or ray (Ray tasks; pip install 'deltawise[ray]')"},
                "jobs": {"default": 0, "help": "local executor: branches trained at once (0: all branches of a round)"},
                "job_cpus": {"long": "--branch-cpus", "help": "ray executor: CPUs each branch task asks for (per worker "
                                                              "with --branch-workers)"},
                "job_gpus": {"long": "--branch-gpus", "help": "ray executor: GPUs each branch task asks for (1: a GPU per "
                                                              "branch; per worker with --branch-workers)"},
                "job_workers": {"long": "--branch-workers", "help": "ray executor: processes each branch trains on, as one "
                                "DDP run (Ray Train TorchTrainer; a global batch of N x --batch-size), e.g. 2 with "
                                "--branch-gpus 1 for 2 GPUs per branch"}}
# the commands whose jobs run in one process each leave the multi-process field out
ONE_PROCESS_JOBS = ("job_workers",)


@dataclass
class LrSweepOptions:
    """The learning-rate grid of ``deltawise lr-sweep`` (search/lr_sweep.py): short runs, scored for gain and retention."""

    lrs: str = option("1e-5,1e-4,1e-3", "learning rates to try, comma-separated")
    steps: int = option(50, "optimizer steps of each short run", min=1)

    def rates(self) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in self.lrs.split(",") if v.strip())
        except ValueError:
            raise InputError(f"--lrs takes comma-separated numbers, e.g. 1e-5,1e-4,1e-3; got {self.lrs!r}") from None


@dataclass
class GuardOptions:
    """Training with a forgetting budget (docs/adapt.md, "Training with a forgetting budget"): with ``--retain``,
    check retention while training and keep the best checkpoint within the budget (adapt/guard.py)."""

    monitor_every: int = option(0, "--retain: optimizer steps between retention checks (0: as often as keeps the checks "
                                   "at about 10% of the training time, measured while training)", min=0)
    stop_early: bool = option(False, "--retain: stop once retention is below the budget and the target gain has not "
                                     "improved for --patience checks")
    patience: int = option(2, "--stop-early: checks without a target gain improvement before stopping", min=1)
    interpolate: bool = option(False, "--retain: at the end, search base->final (WiSE-FT) and kept->final for the best "
                                      "model within the budget (writes a full model when an interpolated point wins)")
    interpolate_refine: int = option(0, "--interpolate: successive refinement rounds after the 0.2-step λ grid (each tries "
                                        "the midpoints around a segment's best point within the budget)", min=0)


def scalar(text: str) -> Any:
    """A YAML scalar: 0.5 -> float, 3 -> int, true -> bool, anything else stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


def parse_assignments(items: list[str] | None, option: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a malformed or repeated key is an error."""
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise InputError(f"{option} takes NAME=VALUE, got {item!r}")
        if key in result:
            raise InputError(f"{option} {key} is given twice")
        result[key] = value.strip()
    return result
