"""mergekit compatibility: a mergekit recipe for a method both tools share runs unchanged in
deltawise and gives the tensors mergekit (the reference, ``mergekit==0.1.5`` from the ``test``
extra) gives.

Each deterministic case writes ONE recipe YAML file, runs it in-process with mergekit's
Python API and with deltawise (``deltawise.merge.merge``; one case through the CLI), and
compares every output tensor: same names, shapes and dtypes, values within atol=1e-6,
rtol=1e-5 (float32 models). DARE is random, so it is compared statistically.

Notes on mergekit 0.1.5 semantics the recipes rely on (paths under mergekit/):
- ``weight`` has no default for linear/task_arithmetic/ties/... (merge_methods/linear.py:22,
  merge_methods/generalized_task_arithmetic.py:53-57), so every recipe sets it for every model.
- gradients are interpolated over t = layer / (num_layers - 1); embeddings, final norm and
  lm_head are planned with t = 0 (plan.py:290-335, config.py:27-73).
- a base_model listed under ``models`` is excluded from the task vectors (its NON_BASE
  parameters are not even resolved: parameter_resolver.py:62-65;
  generalized_task_arithmetic.py:92-93 uses group.non_base).
- the ``bert_family`` fixture is not used: mergekit 0.1.5 cannot plan BertModel merges at all
  (plan.py:186 adds a list to WeightInfo.aliases, a tuple: "TypeError: can only concatenate
  list (not "tuple") to list" for the optional BERT weights that have aliases).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import perturb, save_llama
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge as mergekit_run_merge
from mergekit.options import MergeOptions as MergekitOptions

from deltawise.merge import merge as deltawise_merge

ATOL, RTOL = 1e-6, 1e-5  # float32 models
BF16_ATOL, BF16_RTOL = 1e-3, 1e-2  # about one bfloat16 ulp


# --------------------------------------------------------------------------- helpers


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file of a model folder."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"{folder} holds no .safetensors file"
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(f)
        overlap = set(state) & set(part)
        assert not overlap, f"{folder}: tensors {sorted(overlap)} appear in two shards"
        state.update(part)
    return state


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_mergekit(recipe_path: Path, out: Path, seed: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Run a recipe file with mergekit's Python API, in-process, on CPU."""
    text = recipe_path.read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))  # fresh: the planner mutates it
    options = MergekitOptions(
        device="cpu", copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False,
        write_model_card=False, quiet=True, random_seed=seed,  # random_seed: torch/numpy/random (merge.py:36-37)
    )
    mergekit_run_merge(config, str(out), options, config_source=text)
    return load_folder(out)


def run_deltawise(recipe_path: Path, out: Path, cli: bool = False) -> dict[str, torch.Tensor]:
    if cli:
        proc = subprocess.run(
            [sys.executable, "-m", "deltawise", "merge", str(recipe_path), str(out), "--quiet"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, f"deltawise CLI failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    else:
        deltawise_merge(str(recipe_path), str(out))
    return load_folder(out)


def _runner(tmp_path: Path) -> Callable[..., tuple[dict, dict, Path]]:
    """``run(recipe, cli=False)``: the recipe written once to a fresh folder under tmp_path, merged by mergekit and
    by deltawise; (theirs, ours, deltawise's output folder)."""
    runs = iter(range(1000))

    def run(recipe: dict, *, cli: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Path]:
        work = tmp_path / f"run{next(runs)}"
        work.mkdir()
        path = write_recipe(work / "recipe.yaml", recipe)
        out = work / "deltawise_out"
        return run_mergekit(path, work / "mergekit_out"), run_deltawise(path, out, cli=cli), out

    return run


@pytest.fixture
def merge_both(tmp_path) -> Callable[..., tuple[dict, dict, Path]]:
    """``merge_both(recipe)``: (mergekit's tensors, deltawise's tensors, deltawise's output folder)."""
    return _runner(tmp_path)


def layer_source(path: Path, first: int, end: int, **parameters) -> dict:
    """A slice's source entry: ``path``'s layers first..end-1, with its parameters when given."""
    entry = {"model": str(path), "layer_range": [first, end]}
    return {**entry, "parameters": parameters} if parameters else entry


def max_diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a if k in b}


def assert_same_tensors(
    reference: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], *, atol: float = ATOL, rtol: float = RTOL,
    label: str = "",
) -> None:
    """Same names, shapes, dtypes; values within atol + rtol*|reference| (compared in float32)."""
    assert set(actual) == set(reference), (
        f"{label}: tensor names differ; only mergekit: {sorted(set(reference) - set(actual))}, "
        f"only deltawise: {sorted(set(actual) - set(reference))}"
    )
    problems = []
    for name in sorted(reference):
        ref, act = reference[name], actual[name]
        if ref.shape != act.shape or ref.dtype != act.dtype:
            problems.append(f"{name}: mergekit {tuple(ref.shape)} {ref.dtype}, deltawise {tuple(act.shape)} {act.dtype}")
            continue
        r, x = ref.float(), act.float()
        excess = (x - r).abs() - (atol + rtol * r.abs())
        if bool((excess > 0).any()):
            problems.append(
                f"{name}: max |diff| {float((x - r).abs().max()):.3e}, "
                f"{int((excess > 0).sum())}/{r.numel()} entries out of tolerance"
            )
    assert not problems, f"{label}: deltawise differs from mergekit:\n  " + "\n  ".join(problems)


def assert_not_a_copy(out: dict[str, torch.Tensor], inputs: dict[str, dict[str, torch.Tensor]]) -> None:
    """Guard against vacuous comparisons: the merge must differ from each of its inputs."""
    for label, state in inputs.items():
        worst = max(max_diffs(state, out).values())
        assert worst > 1e-4, f"the merge equals input {label} (max |diff| {worst:.1e}): the recipe had no effect"


def entry(path: Path, **parameters) -> dict:
    return {"model": str(path), "parameters": parameters} if parameters else {"model": str(path)}


def attn_mlp_split(state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    return [k for k in state if "self_attn" in k], [k for k in state if ".mlp." in k]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory) -> dict[str, Path]:
    """Like ``llama_family`` with 5 layers, so depth gradients hit fractional positions
    (t = 0, 0.25, 0.5, 0.75, 1) and not only their end points."""
    root = tmp_path_factory.mktemp("llama5")
    base = save_llama(root / "base", seed=5, num_hidden_layers=5)
    family = {"base": base}
    for i in (1, 2, 3):
        family[f"ft{i}"] = perturb(base, root / f"ft{i}", seed=10 + i)
    return family


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory) -> dict[str, Path]:
    """Tied input/output embeddings (no lm_head.weight in the files), as in Llama 3.2 1B/3B."""
    root = tmp_path_factory.mktemp("llama_tied")
    base = save_llama(root / "base", seed=7, tie_word_embeddings=True)
    family = {"base": base}
    for i in (1, 2, 3):
        family[f"ft{i}"] = perturb(base, root / f"ft{i}", seed=20 + i)
    return family


@pytest.fixture(scope="module")
def mixed_family(llama_family, tmp_path_factory) -> dict[str, Path]:
    """``llama_family`` with ft1 saved tied (no lm_head.weight, tie_word_embeddings: true, so its
    embedding serves as its lm_head) and ft2 sharded in two files with an index."""
    root = tmp_path_factory.mktemp("llama_mixed")
    family = dict(llama_family)
    tied = root / "ft1_tied"
    tied.mkdir()
    state = load_folder(llama_family["ft1"])
    state.pop("lm_head.weight")
    save_file(state, tied / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((llama_family["ft1"] / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    sharded = root / "ft2_sharded"
    sharded.mkdir()
    state = load_folder(llama_family["ft2"])
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        filename = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, sharded / filename, metadata={"format": "pt"})
        weight_map.update({k: filename for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text((llama_family["ft2"] / "config.json").read_text())
    family.update(ft1=tied, ft2=sharded)
    return family


@pytest.fixture
def run_both(tmp_path) -> Callable[..., tuple[dict, dict]]:
    """Llama recipes: ``_runner``'s (theirs, ours), both output configs checked to name LlamaForCausalLM."""
    both = _runner(tmp_path)

    def run(recipe: dict, *, cli: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        theirs, ours, out = both(recipe, cli=cli)
        for folder in ("mergekit_out", "deltawise_out"):
            config = json.loads((out.parent / folder / "config.json").read_text())
            assert config["architectures"] == ["LlamaForCausalLM"], f"{folder}/config.json: {config.get('architectures')}"
        return theirs, ours

    return run


# --------------------------------------------------------------------------- recipes

W3 = (0.2, 0.3, 0.5)


def linear_default(f):
    return {"merge_method": "linear", "models": [entry(f[f"ft{i + 1}"], weight=w) for i, w in enumerate(W3)]}


def linear_integer_weights(f):
    # weights summing to 6: the default normalize: true must divide by the sum
    return {"merge_method": "linear", "models": [entry(f[f"ft{i + 1}"], weight=w) for i, w in enumerate((1, 2, 3))]}


def linear_no_normalize(f):
    # weights summing to 1.6 so normalize: false (no division) is distinguishable from the default
    return {
        "merge_method": "linear",
        "models": [entry(f[f"ft{i + 1}"], weight=w) for i, w in enumerate((0.4, 0.6, 0.6))],
        "parameters": {"normalize": False},
    }


def task_arithmetic(f):
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": [entry(f["ft1"], weight=0.6), entry(f["ft2"], weight=0.8), entry(f["ft3"], weight=-0.3)],
        "parameters": {"lambda": 0.7},
        "dtype": "float32",
    }


def task_arithmetic_base_listed(f):
    # the base under `models` too (mergekit allows it), even with a weight: it is no task vector,
    # and with normalize: true its weight must not join the divisor either
    recipe = task_arithmetic(f)
    recipe["models"] = [entry(f["base"], weight=1.0)] + recipe["models"]
    recipe["parameters"]["normalize"] = True
    recipe.pop("dtype")
    return recipe


def ties(f):
    return {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [entry(f[f"ft{i + 1}"], weight=w, density=0.3) for i, w in enumerate((0.5, 1.0, 0.8))],
        "parameters": {},
        "dtype": "float32",
    }


def task_arithmetic_out_bf16(f):
    # computed in float32 by both, then cast: must be bit-identical, so the float32 tolerance applies
    return {**task_arithmetic(f), "out_dtype": "bfloat16"}


def ties_base_listed(f):
    recipe = ties(f)
    recipe["models"] = [entry(f["base"])] + recipe["models"]
    recipe.pop("dtype")
    recipe["parameters"] = {"int8_mask": True}
    return recipe


def linear_base_unlisted(f):
    # base_model NOT under models, weight given recipe-wide: mergekit appends the base as one more
    # input of the average (plan.py:143-156; linear's InputContract has base=IGNORED, base.py:118)
    return {
        "merge_method": "linear",
        "base_model": str(f["base"]),
        "models": [entry(f[f"ft{i + 1}"]) for i in range(3)],
        "parameters": {"weight": 1.0},
    }


def ties_gradient_filters(f):
    # (5-layer family) precedence: model parameters > top-level parameters > defaults;
    # depth gradients, filter lists, a filtered gradient; normalize left at its default (true)
    return {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [
            entry(f["ft1"], density=[0.2, 0.8], weight=[{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]),
            entry(f["ft2"], density=0.5, weight=0.7),
            entry(f["ft3"], density=[{"filter": "mlp", "value": [0.9, 0.1]}, {"value": 0.4}]),
        ],
        "parameters": {"weight": [{"filter": "mlp", "value": [0.3, 1.0, 0.6]}, {"value": 0.4}], "density": 0.6, "lambda": 0.9},
    }


def breadcrumbs(f, method="breadcrumbs"):
    return {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": [entry(f[f"ft{i + 1}"], weight=w) for i, w in enumerate((0.5, 0.3, 0.4))],
        "parameters": {"density": 0.4, "gamma": 0.05},
    }


def breadcrumbs_ties(f):
    return breadcrumbs(f, "breadcrumbs_ties")


def slerp(f):
    # (5-layer family) t = 0 is the base, 1 the other model; a filter list of depth gradients
    return {
        "merge_method": "slerp",
        "base_model": str(f["base"]),
        "models": [entry(f["base"]), entry(f["ft2"])],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]},
                             {"value": 0.5}]},
    }


def model_stock(f, **parameters):
    recipe = {
        "merge_method": "model_stock",
        "base_model": str(f["base"]),
        "models": [entry(f["ft1"]), entry(f["ft2"]), entry(f["ft3"])],
    }
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def model_stock_filter_wise(f):
    return model_stock(f, filter_wise=True)


def model_stock_base_listed(f):
    # were the base counted as a fine-tune, N and the mean cosine would change
    recipe = model_stock(f)
    recipe["models"] = [entry(f["base"])] + recipe["models"]
    return recipe


def slerp_end_points(family, theirs, ours):
    """Pins what the filters must select, so a filter bug shared by both tools cannot pass: layer 0
    attention is the base (t=0), layer 0 MLP the other model (t=1), the last layer the reverse."""
    base, other = load_folder(family["base"]), load_folder(family["ft2"])
    for out in (theirs, ours):
        for name, t in (
            ("model.layers.0.self_attn.q_proj.weight", 0), ("model.layers.0.mlp.up_proj.weight", 1),
            ("model.layers.4.self_attn.q_proj.weight", 1), ("model.layers.4.mlp.up_proj.weight", 0),
        ):
            torch.testing.assert_close(out[name], other[name] if t else base[name], atol=ATOL, rtol=RTOL)


def linear_by_hand(family, theirs, ours):
    """normalize: false is a plain weighted sum (no division by the weights' sum, 1.6)."""
    states = [load_folder(family[f"ft{i}"]) for i in (1, 2, 3)]
    for name in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        expected = 0.4 * states[0][name] + 0.6 * states[1][name] + 0.6 * states[2][name]
        torch.testing.assert_close(ours[name], expected, atol=ATOL, rtol=RTOL)


# (recipe builder, family fixture, run deltawise through the CLI, extra check or None)
CASES = {
    "linear": (linear_default, "llama_family", False, None),
    "linear-integer-weights": (linear_integer_weights, "llama_family", False, None),
    "linear-normalize-false": (linear_no_normalize, "llama_family", False, linear_by_hand),
    "task_arithmetic-float32": (task_arithmetic, "llama_family", False, None),
    "task_arithmetic-base-in-models": (task_arithmetic_base_listed, "llama_family", False, None),
    "task_arithmetic-out_dtype-bfloat16": (task_arithmetic_out_bf16, "llama_family", False, None),
    "task_arithmetic-tied-and-sharded-inputs": (task_arithmetic, "mixed_family", False, None),
    "ties-float32-cli": (ties, "llama_family", True, None),
    "ties-base-in-models": (ties_base_listed, "llama_family", False, None),
    "ties-gradient-filters": (ties_gradient_filters, "deep_family", False, None),
    "ties-tied-embeddings": (ties, "tied_family", False, None),
    "breadcrumbs": (breadcrumbs, "llama_family", False, None),
    "breadcrumbs_ties": (breadcrumbs_ties, "llama_family", False, None),
    "slerp-filtered-gradients": (slerp, "deep_family", False, slerp_end_points),
    "model_stock": (model_stock, "llama_family", False, None),
    "model_stock-filter_wise": (model_stock_filter_wise, "llama_family", False, None),
    "model_stock-base-in-models": (model_stock_base_listed, "llama_family", False, None),
    "linear-base-not-in-models": (linear_base_unlisted, "llama_family", False, None),
}

# case id -> reason, for a deltawise discrepancy found but not fixed yet: the case is marked
# xfail(strict=True), so the suite stays green while the difference stays visible, and fixing it
# turns the case into an XPASS failure that asks for the entry's removal.
KNOWN_DIFFERENCES: dict[str, str] = {}


def _case_params():
    return [
        pytest.param(
            *CASES[name], id=name,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENCES[name])] if name in KNOWN_DIFFERENCES else [],
        )
        for name in CASES
    ]


# --------------------------------------------------------------------------- deterministic methods


@pytest.mark.parametrize("build, family_name, cli, extra_check", _case_params())
def test_recipe_gives_mergekit_tensors(request, run_both, build, family_name, cli, extra_check):
    family = request.getfixturevalue(family_name)
    recipe = build(family)
    theirs, ours = run_both(recipe, cli=cli)
    assert_same_tensors(theirs, ours, label=request.node.callspec.id)
    inputs = {Path(e["model"]).name: load_folder(Path(e["model"])) for e in recipe["models"]}
    assert_not_a_copy(ours, inputs)
    if extra_check is not None:
        extra_check(family, theirs, ours)


def test_mergekit_linear_averages_an_unlisted_base_in(llama_family, tmp_path):
    """Pins the reference behaviour the ``linear-base-not-in-models`` case relies on: mergekit's
    output for that recipe is (base + ft1 + ft2 + ft3) / 4, not (ft1 + ft2 + ft3) / 3 (deltawise
    gave the latter before commit 2e8b171: max |diff| 1.3e-2)."""
    recipe_path = write_recipe(tmp_path / "recipe.yaml", linear_base_unlisted(llama_family))
    theirs = run_mergekit(recipe_path, tmp_path / "mergekit_out")
    states = [load_folder(llama_family[k]) for k in ("base", "ft1", "ft2", "ft3")]
    expected = {k: sum(s[k] for s in states) / 4 for k in states[0]}
    assert_same_tensors(expected, theirs, label="mergekit linear with an unlisted base")


def test_bfloat16_recipe_within_one_ulp(llama_family, run_both):
    """``dtype: bfloat16``: mergekit casts the inputs to bf16 and computes task arithmetic in bf16
    (io/tasks.py:124-125, merge_methods/dtype.py:21-32); deltawise computes in float32 and casts the
    result. Both must write bf16 tensors that agree to about one bf16 ulp.
    Observed max |diff| on these models: 7.8e-3 = one ulp at 1.0 (layer-norm weights), 4.9e-4 =
    one ulp in [0.0625, 0.125) on the projection weights; everywhere within atol + rtol*|ref|."""
    recipe = task_arithmetic(llama_family)
    recipe["dtype"] = "bfloat16"
    theirs, ours = run_both(recipe)
    assert {str(t.dtype) for t in theirs.values()} == {"torch.bfloat16"}
    assert_same_tensors(theirs, ours, atol=BF16_ATOL, rtol=BF16_RTOL, label="task_arithmetic-bfloat16")
    # not vacuous: the bf16 merge is still close to the float32 merge of the same recipe
    recipe["dtype"] = "float32"
    exact, _ = run_both(recipe)
    assert_same_tensors({k: v.to(torch.bfloat16) for k, v in exact.items()}, ours, atol=BF16_ATOL, rtol=BF16_RTOL,
                        label="bf16 vs f32")


# --------------------------------------------------------------------------- DARE (random): statistics

DENSITY = 0.5
N_MERGEKIT_SEEDS = 6
N_DELTAWISE_SEEDS = 30


def dare_recipe(f, method: str, **parameters) -> dict:
    return {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": [entry(f["ft1"], weight=1.0, density=DENSITY)],
        "parameters": parameters,
    }


@pytest.fixture(scope="module")
def dare_runs(llama_family, tmp_path_factory):
    """Outputs of single-model DARE merges, over several seeds, for both tools and methods.

    mergekit gets the unchanged recipe file and a seed through MergeOptions.random_seed; deltawise
    gets a copy with its ``seed:`` extension (mergekit would reject the unknown key)."""
    root = tmp_path_factory.mktemp("dare")
    runs: dict[tuple[str, str, bool], list[dict[str, torch.Tensor]]] = {}
    for method in ("dare_linear", "dare_ties"):
        for rescale in (True, False):
            recipe = dare_recipe(llama_family, method, **({} if rescale else {"rescale": False}))
            tag = f"{method}-{'rescale' if rescale else 'droponly'}"
            recipe_path = write_recipe(root / f"{tag}.yaml", recipe)
            runs[(method, "mergekit", rescale)] = [
                run_mergekit(recipe_path, root / f"{tag}-mk-{s}", seed=s) for s in range(N_MERGEKIT_SEEDS)
            ]
            n_ours = N_DELTAWISE_SEEDS if (method == "dare_linear" and rescale) else N_MERGEKIT_SEEDS
            ours = []
            for s in range(n_ours):
                seeded = write_recipe(root / f"{tag}-seed{s}.yaml", {**copy.deepcopy(recipe), "seed": s})
                ours.append(run_deltawise(seeded, root / f"{tag}-dw-{s}"))
            runs[(method, "deltawise", rescale)] = ours
    return runs


DARE_IDS = [
    pytest.param(m, tool, id=f"{m}-{tool}") for m in ("dare_linear", "dare_ties") for tool in ("mergekit", "deltawise")
]


@pytest.mark.parametrize("method, tool", DARE_IDS)
def test_dare_keeps_density_fraction(llama_family, dare_runs, method, tool):
    """(a) the fraction of task-vector entries kept is close to density, overall and per tensor."""
    base, tuned = load_folder(llama_family["base"]), load_folder(llama_family["ft1"])
    for out in dare_runs[(method, tool, True)]:
        assert set(out) == set(base)
        kept = total = 0
        for name, b in base.items():
            assert bool((tuned[name] != b).all()), "the fixture's task vector should have no zero entry"
            k = int((out[name] != b).sum())
            kept, total = kept + k, total + b.numel()
            if b.numel() >= 1000:  # binomial std <= 0.016: 6 sigma
                assert abs(k / b.numel() - DENSITY) < 0.1, f"{tool} {method} {name}: kept {k / b.numel():.3f}"
        # ~27k entries: std 0.003
        assert abs(kept / total - DENSITY) < 0.02, f"{tool} {method}: kept {kept / total:.4f} of the entries"


@pytest.mark.parametrize("method, tool", DARE_IDS)
def test_dare_rescale_preserves_l1_norm(llama_family, dare_runs, method, tool):
    """(b) default rescale (L1, mergekit sparsify.py:40-53): survivors are scaled by one factor per
    tensor so that the task vector keeps its L1 norm; with ``rescale: false`` survivors are unchanged."""
    base, tuned = load_folder(llama_family["base"]), load_folder(llama_family["ft1"])
    for rescale in (True, False):
        for out in dare_runs[(method, tool, rescale)]:
            for name, b in base.items():
                tau = (tuned[name] - b).double()
                got = (out[name] - b).double()
                kept = got != 0
                # one scale factor per tensor: ||tau||_1 / ||kept tau||_1 (1 without rescale); the
                # check allows a few float32 ulps of the output (got = out - base loses precision)
                scale = float(tau.abs().sum() / tau[kept].abs().sum()) if rescale else 1.0
                error = (got - scale * tau * kept).abs()
                bound = 8 * torch.finfo(torch.float32).eps * (b.double().abs() + (scale * tau).abs())
                ratio = got[kept] / tau[kept]
                assert bool((error <= bound).all()), (
                    f"{tool} {method} rescale={rescale} {name}: survivors scaled by "
                    f"{float(ratio.min()):.5f}..{float(ratio.max()):.5f}, expected {scale:.5f}"
                )
                if rescale:
                    l1_out, l1_tau = float(got.abs().sum()), float(tau.abs().sum())
                    assert l1_out == pytest.approx(l1_tau, rel=1e-4), f"{tool} {method} {name}: L1 {l1_out} vs {l1_tau}"


def test_dare_average_over_seeds_approaches_task_vector(llama_family, dare_runs):
    """(c) averaged over seeds, deltawise's DARE task vector approaches the full one (each entry
    survives with probability density and is scaled by ~1/density). With density 0.5 the relative
    error of an n-seed mean is ~1/sqrt(n): ~1 for one seed, ~0.18 for 30. mergekit's mean over its
    seeds must show the same behaviour (same estimator), so the two are compared at equal n."""
    base, tuned = load_folder(llama_family["base"]), load_folder(llama_family["ft1"])
    names = [n for n in base if base[n].numel() >= 1000]

    def mean_relative_error(outs: list[dict[str, torch.Tensor]]) -> float:
        errors = []
        for name in names:
            tau = (tuned[name] - base[name]).double()
            mean = torch.stack([(o[name] - base[name]).double() for o in outs]).mean(dim=0)
            errors.append(float((mean - tau).norm() / tau.norm()))
        return sum(errors) / len(errors)

    ours = dare_runs[("dare_linear", "deltawise", True)]
    curve = {n: mean_relative_error(ours[:n]) for n in (1, 5, 10, 30)}
    assert curve[1] > curve[5] > curve[10] > curve[30], f"error does not shrink with more seeds: {curve}"
    for n, err in curve.items():
        assert 0.6 / n**0.5 < err < 1.4 / n**0.5, f"relative error {err:.3f} with {n} seeds, expected ~{1 / n**0.5:.3f}: {curve}"
    theirs = dare_runs[("dare_linear", "mergekit", True)]
    n = len(theirs)
    ours_n, theirs_n = mean_relative_error(ours[:n]), mean_relative_error(theirs)
    assert ours_n == pytest.approx(theirs_n, rel=0.25), f"{n}-seed mean error: deltawise {ours_n:.3f}, mergekit {theirs_n:.3f}"


def test_dare_seeds_give_different_masks_but_same_seed_repeats(llama_family, dare_runs, tmp_path):
    """The seeds used above really change deltawise's masks (else (c) would be meaningless), and
    the recipe's seed reproduces the same output."""
    ours = dare_runs[("dare_linear", "deltawise", True)]
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ours[0][name], ours[1][name])
    recipe = {**dare_recipe(llama_family, "dare_linear"), "seed": 1}
    again = run_deltawise(write_recipe(tmp_path / "again.yaml", recipe), tmp_path / "again")
    assert_same_tensors(ours[1], again, atol=0, rtol=0, label="same seed")
