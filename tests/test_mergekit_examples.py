"""mergekit's example recipes (its repository's examples/ folder), changed only in model paths, run
through mergekit 0.1.5 and deltawise on tiny local models of the same shape (40 layers for the
13B recipes, 12 for GPT-2): the same tensors.

The texts are those of examples/gradient-slerp.yml, orcamini-platy-44layer.yml, linear.yml, ties.yml
(the TIES version; the latest uses ranked_ties, which mergekit 0.1.5 does not have), arcee_fusion.yml
and gpt2-small.yml.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import perturb
from test_mergekit_compat import assert_same_tensors, assert_not_a_copy, load_folder, run_deltawise, run_mergekit

EXAMPLES = {
    "gradient-slerp": """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "orcamini-platy-44layer": """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "linear": """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "ties": """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "arcee_fusion": """\
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
""",
    "gpt2-small": """\
slices:
  - sources:
    - model: gpt2
      layer_range: [0, 8]
merge_method: passthrough
dtype: float16
""",
}

LLAMA_13B_NAMES = ["TheBloke/Llama-2-13B-fp16", "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B",
                   "WizardLM/WizardLM-13B-V1.2", "WizardLM/WizardMath-13B-V1.0"]
HALF_ATOL, HALF_RTOL = 2e-3, 2e-3  # one float16/bfloat16 rounding of float32 results that may differ in the last bit


@pytest.fixture(scope="module")
def example_models(tmp_path_factory) -> dict[str, Path]:
    """Model name in the examples -> a tiny local model: 40-layer float16 Llamas for the 13B recipes (one
    base, fine-tunes as noise on it; float16 like the checkpoints the recipes were written for), two
    bfloat16 ones for arcee_fusion, a 12-layer float16 GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("examples")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=40, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(root / "llama-13b")
    models = {LLAMA_13B_NAMES[0]: root / "llama-13b"}
    for seed, name in enumerate(LLAMA_13B_NAMES[1:], start=1):
        models[name] = perturb(root / "llama-13b", root / name.replace("/", "--"), seed=seed, scale=0.02)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "llama-bf16")
    models["model_a"] = perturb(root / "llama-bf16", root / "model_a", seed=11, scale=0.02)
    models["model_b"] = perturb(root / "llama-bf16", root / "model_b", seed=12, scale=0.02)
    torch.manual_seed(1)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=12, n_head=2, vocab_size=64, n_positions=32))
    gpt2.to(torch.float16).save_pretrained(root / "gpt2")
    models["gpt2"] = root / "gpt2"
    return models


def _localised(text: str, models: dict[str, Path]) -> str:
    """The example with each model name replaced by its local path, and nothing else changed."""
    data = yaml.safe_load(text)

    def swap(value):
        if isinstance(value, dict):
            return {k: (str(models[v]) if k in ("model", "base_model") and v in models else swap(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    return yaml.safe_dump(swap(data), sort_keys=False)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_recipe_gives_mergekit_tensors(example_models, tmp_path, example):
    recipe = tmp_path / f"{example}.yml"
    recipe.write_text(_localised(EXAMPLES[example], example_models))
    theirs = run_mergekit(recipe, tmp_path / "mergekit_out")
    ours = run_deltawise(recipe, tmp_path / "deltawise_out")
    if example == "arcee_fusion":
        _compare_arcee_fusion(theirs, ours, example_models, recipe, tmp_path)
    elif example == "ties":
        _compare_ties(theirs, ours, recipe, tmp_path)
    else:
        assert_same_tensors(theirs, ours, atol=HALF_ATOL, rtol=HALF_RTOL, label=example)
    data = yaml.safe_load(recipe.read_text())
    sources = [s["model"] for sl in data.get("slices", []) for s in sl["sources"]] + [m["model"] for m in data.get("models", [])]
    if data["merge_method"] != "passthrough":  # a merge, not a copy of one of its inputs
        assert_not_a_copy(ours, {s: {k: v.to(ours[k].dtype) for k, v in load_folder(Path(s)).items() if k in ours}
                                 for s in dict.fromkeys(sources)})
    if example == "orcamini-platy-44layer":
        assert sum(k.endswith("self_attn.q_proj.weight") for k in ours) == 44


def _compare_arcee_fusion(theirs: dict, ours: dict, models: dict[str, Path], recipe: Path, tmp_path: Path) -> None:
    """mergekit computes arcee_fusion's softmax/KL importance in the recipe's dtype (bfloat16 here), so
    entries near the threshold fall on the other side of it; deltawise computes in float32. Each tool
    takes, entry by entry, model_a's or model_b's value, and they agree on most entries; with the
    recipe's dtype float32 both compute alike and agree exactly. mergekit also writes the float32
    result whatever ``dtype`` says; deltawise writes the recipe's dtype, as for every method."""
    assert {v.dtype for v in theirs.values()} == {torch.float32} and {v.dtype for v in ours.values()} == {torch.bfloat16}
    a, b = load_folder(models["model_a"]), load_folder(models["model_b"])
    agree = total = 0

    def near(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.float() - y.float()).abs() <= HALF_ATOL + 1e-2 * y.float().abs()  # one bfloat16 rounding

    for name, mine in ours.items():
        ref = theirs[name]
        for out in (mine, ref):
            assert bool((near(out, a[name]) | near(out, b[name])).all()), name
        agree += int(near(mine, ref).sum())
        total += mine.numel()
    assert agree / total > 0.8, agree / total
    data = yaml.safe_load(recipe.read_text())
    exact = tmp_path / "float32.yml"
    exact.write_text(yaml.safe_dump({**data, "dtype": "float32"}))
    assert_same_tensors(run_mergekit(exact, tmp_path / "mk32"), run_deltawise(exact, tmp_path / "dw32"),
                        label="arcee_fusion float32")


def _compare_ties(theirs: dict, ours: dict, recipe: Path, tmp_path: Path) -> None:
    """mergekit computes TIES in the recipe's dtype (float16 task vectors, trims and sign sums), deltawise
    in float32, rounding once: an entry at a trim or sign boundary can go the other way. All but a few
    entries agree to one float16 rounding, and with ``dtype: float32`` every entry does."""
    off = total = 0
    for name, ref in theirs.items():
        excess = (ours[name].float() - ref.float()).abs() - (HALF_ATOL + HALF_RTOL * ref.float().abs())
        off += int((excess > 0).sum())
        total += ref.numel()
    assert off / total < 1e-3, f"{off} of {total} entries differ"
    exact = tmp_path / "float32.yml"
    exact.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "dtype": "float32"}))
    assert_same_tensors(run_mergekit(exact, tmp_path / "mk32"), run_deltawise(exact, tmp_path / "dw32"), label="ties float32")
