"""``modules:`` recipes with several modules: a vision-language model (LLaVA) merged one layer stack at a time.

Tiny LLaVA models (a 3-layer Llama text decoder, a 2-layer CLIP vision encoder) are merged by mergekit 0.1.5
itself and by deltawise from the same recipe file, and every tensor is compared. mergekit has no architecture
file for LLaVA and infers its modules from the tensor names (mergekit/architecture/auto.py): one per layer
stack, named by its path, and ``default`` for everything else; deltawise takes the same modules from its table
(deltawise.architecture.MODULE_TABLES, which adds the hub layout's names; other families: test_modules_inferred.py).
mergekit leaves the output config's layer counts as they were (it has no config key for an inferred module and
only warns), so those are checked against the count by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_mergekit_compat import assert_not_a_copy, assert_same_tensors, load_folder, run_deltawise, write_recipe
from test_mergekit_compat import layer_source as src, merge_both  # noqa: F401 (merge_both: a fixture)

from deltawise.errors import RecipeError
from deltawise.merge import build_plan, parse_recipe

TEXT = "model.language_model.layers"  # mergekit 0.1.5's names of LLaVA's modules (transformers 5 layout)
VISION = "model.vision_tower.encoder.layers"


def llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                              image_size=8, patch_size=4, projection_dim=8)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=63, vision_feature_layer=-1,
                         tie_word_embeddings=False)
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def save_llava(path: Path, state: dict[str, torch.Tensor], legacy: bool = False) -> Path:
    """``state`` (transformers 5 names) as a model folder; ``legacy``: as save_pretrained writes it
    (language_model.model.*, vision_tower.*), the layout of the checkpoints on the hub."""
    from transformers import LlavaForConditionalGeneration

    if legacy:
        model = LlavaForConditionalGeneration(llava_config())
        model.load_state_dict(state)
        model.save_pretrained(path)
        return path
    path.mkdir(parents=True)
    llava_config().save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaVA base and two fine-tunes (base + noise), in transformers 5's layout."""
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(5)
    base = {k: v.detach().clone() for k, v in LlavaForConditionalGeneration(llava_config()).state_dict().items()}
    out = {"base": save_llava(root / "base", base)}
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        out[f"ft{seed}"] = save_llava(root / f"ft{seed}", {k: v + 0.05 * torch.randn(v.shape, generator=gen)
                                                            for k, v in base.items()})
    return out


def layer_counts(folder: Path) -> tuple[int, int]:
    config = json.loads((folder / "config.json").read_text())
    return config["text_config"]["num_hidden_layers"], config["vision_config"]["num_hidden_layers"]


def loads_whole(cls, folder: Path):
    """The model of ``folder``, every tensor where its config puts one: none missing, extra or misshapen."""
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


def runs_in_transformers(folder: Path) -> None:
    """The output loads as a LLaVA (every tensor where its config says) and runs on text and an image."""
    from transformers import LlavaForConditionalGeneration

    model = loads_whole(LlavaForConditionalGeneration, folder)
    ids = torch.tensor([[1] + [63] * 4 + [5, 7]])  # 63: the image token; an 8x8 image is 2x2 patches: 4 features
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 8, 8)).logits
    assert logits.shape == (1, 7, 64) and torch.isfinite(logits).all()


def test_layer_stacking_per_module_matches_mergekit(llava, merge_both):
    # the text decoder becomes a 4-layer frankenmerge (layers 0-1 of ft1, 1-2 of ft2); the vision encoder
    # is ft2's; everything outside the stacks (embeddings, projector, norms, LM head) is ft1's
    recipe = {"merge_method": "passthrough", "dtype": "float32", "modules": {
        "default": {"slices": [{"sources": [src(llava["ft1"], 0, 0)]}]},
        TEXT: {"slices": [{"sources": [src(llava["ft1"], 0, 2)]}, {"sources": [src(llava["ft2"], 1, 3)]}]},
        VISION: {"slices": [{"sources": [src(llava["ft2"], 0, 2)]}]},
    }}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="LLaVA frankenmerge")
    ft1, ft2 = load_folder(llava["ft1"]), load_folder(llava["ft2"])
    assert len(dw) == len(ft1) + 9  # one more text layer of 9 tensors
    assert torch.equal(dw[f"{TEXT}.1.mlp.up_proj.weight"], ft1[f"{TEXT}.1.mlp.up_proj.weight"])
    assert torch.equal(dw[f"{TEXT}.3.mlp.up_proj.weight"], ft2[f"{TEXT}.2.mlp.up_proj.weight"])
    assert torch.equal(dw[f"{VISION}.1.mlp.fc1.weight"], ft2[f"{VISION}.1.mlp.fc1.weight"])
    for name in ("lm_head.weight", "model.language_model.norm.weight", "model.multi_modal_projector.linear_1.weight",
                 "model.vision_tower.post_layernorm.weight"):
        assert torch.equal(dw[name], ft1[name])
    assert layer_counts(out) == (4, 2)  # mergekit's config keeps (3, 2): it warns it has no key for the count
    runs_in_transformers(out)


def test_slerp_with_per_module_slices_parameters_and_gradients_matches_mergekit(llava, merge_both):
    # each module its own t: default by module parameters, the text stack by a gradient over its slice,
    # the vision stack by a slice parameter overriding its module's; the recipe's t is the fallback
    recipe = {"merge_method": "slerp", "base_model": str(llava["ft1"]), "dtype": "float32", "parameters": {"t": 0.5},
              "modules": {
                  "default": {"models": [{"model": str(llava["ft1"])}, {"model": str(llava["ft2"])}],
                              "parameters": {"t": 0.3}},
                  TEXT: {"slices": [{"sources": [src(llava["ft1"], 0, 3), src(llava["ft2"], 0, 3)]}],
                         "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": [1, 0.2]}]}},
                  VISION: {"slices": [{"sources": [src(llava["ft1"], 0, 2), src(llava["ft2"], 0, 2)],
                                       "parameters": {"t": 0.8}}], "parameters": {"t": 0.1}},
              }}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="LLaVA slerp")
    assert_not_a_copy(dw, {"ft1": load_folder(llava["ft1"]), "ft2": load_folder(llava["ft2"])})
    assert layer_counts(out) == (3, 2)


def test_linear_with_whole_models_per_module_matches_mergekit(llava, merge_both):
    # three models, a different weighting per module (module parameters, then a model's own)
    models = [{"model": str(llava[k])} for k in ("base", "ft1", "ft2")]
    recipe = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0}, "modules": {
        "default": {"models": models},
        TEXT: {"models": [models[0], {**models[1], "parameters": {"weight": 3.0}}, models[2]]},
        VISION: {"models": models, "parameters": {"weight": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 1.0}]}},
    }}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="LLaVA linear")
    states = [load_folder(llava[k]) for k in ("base", "ft1", "ft2")]
    name = f"{TEXT}.2.self_attn.q_proj.weight"  # by hand: (1 * base + 3 * ft1 + 1 * ft2) / 5
    assert torch.allclose(dw[name], (states[0][name] + 3 * states[1][name] + states[2][name]) / 5, atol=1e-6)
    assert layer_counts(out) == (3, 2)


def test_checkpoints_in_the_hub_layout_merge_alike_under_their_own_names(llava, tmp_path):
    # transformers 4 checkpoints (and transformers 5's save_pretrained) name the stacks language_model.model.layers
    # and vision_tower.*: the same recipe gives the same tensors, under those names; a module may be named by
    # either path. (mergekit 0.1.5 with transformers 5 drops the text decoder of such checkpoints.)
    legacy = {k: save_llava(tmp_path / k, load_folder(llava[k]), legacy=True) for k in ("ft1", "ft2")}
    recipes = {}
    for key, models, text in (("new", llava, TEXT), ("old", legacy, "language_model.model.layers")):
        recipes[key] = {"merge_method": "passthrough", "modules": {
            "default": {"slices": [{"sources": [src(models["ft2"], 0, 0)]}]},
            text: {"slices": [{"sources": [src(models["ft2"], 2, 3)]}, {"sources": [src(models["ft1"], 0, 3)]}]},
            VISION: {"slices": [{"sources": [src(models["ft1"], 1, 2)]}]},
        }}
    new = run_deltawise(write_recipe(tmp_path / "new.yaml", recipes["new"]), tmp_path / "new_out")
    old = run_deltawise(write_recipe(tmp_path / "old.yaml", recipes["old"]), tmp_path / "old_out")
    assert any(k.startswith("language_model.model.layers.3.") for k in old)
    assert len(old) == len(new) == len(load_folder(llava["ft1"])) + 9 - 16  # one more text layer, one less vision
    assert layer_counts(tmp_path / "old_out") == (4, 1)
    from transformers import LlavaForConditionalGeneration

    loaded = loads_whole(LlavaForConditionalGeneration, tmp_path / "old_out").state_dict()
    assert set(loaded) == set(new)
    for name, value in new.items():
        assert torch.equal(loaded[name], value), name
    runs_in_transformers(tmp_path / "old_out")


def test_a_model_of_another_architecture_in_the_recipe_is_refused_naming_it(llava, tmp_path):
    # LLaVA's tensors under a Qwen2-VL config: the modules are LLaVA's, the architecture is not
    folder = tmp_path / "qwen2vl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"],
                                                    "model_type": "qwen2_vl", "num_hidden_layers": 3}))
    save_file(load_folder(llava["ft1"]), str(folder / "model.safetensors"))
    recipe = parse_recipe({"merge_method": "linear", "modules": _modules(
        llava, **{TEXT: {"slices": [{"sources": [src(llava["ft1"], 0, 3), src(folder, 0, 3)]}]}})})
    with pytest.raises(RecipeError) as exc:
        build_plan(recipe)
    assert (f"{folder} is Qwen2VLForConditionalGeneration, not LlavaForConditionalGeneration as {llava['ft1']}; "
            "a modules: recipe merges models of one architecture") in str(exc.value)


def _modules(llava, **overrides) -> dict:
    modules = {"default": {"slices": [{"sources": [src(llava["ft1"], 0, 0)]}]},
               TEXT: {"slices": [{"sources": [src(llava["ft1"], 0, 3)]}]},
               VISION: {"slices": [{"sources": [src(llava["ft1"], 0, 2)]}]}}
    modules.update(overrides)
    return {k: v for k, v in modules.items() if v is not None}


@pytest.mark.parametrize("change, message", [
    ({VISION: None}, f"the recipe lacks {VISION}, whose tensors the output would not have"),
    ({VISION: None, "vision_tower": {"slices": [{"sources": [{"layer_range": [0, 2]}]}]}},
     f"modules.vision_tower: LlavaForConditionalGeneration has no module 'vision_tower'; its modules are default, "
     f"{TEXT}, {VISION}"),
    ({"language_model.model.layers": {"slices": [{"sources": [{"layer_range": [0, 1]}]}]}},
     f"{TEXT} is listed twice (under {TEXT} and language_model.model.layers)"),
    ({"default": {"slices": [{"sources": [{"layer_range": [0, 1]}]}]}},
     "layer_range [0, 1], but this module holds no layers (the tensors outside the layer stacks); its layer_range is [0, 0]"),
    ({TEXT: {"slices": [{"sources": [{"layer_range": [1, 4]}]}]}}, "layer_range [1, 4] goes past the 3 layers"),
])
def test_modules_that_do_not_fit_the_model_are_refused(llava, change, message):
    for module in change.values():
        for sl in (module or {}).get("slices", []):
            for s in sl["sources"]:
                s.setdefault("model", str(llava["ft1"]))
    recipe = parse_recipe({"merge_method": "passthrough", "modules": _modules(llava, **change)})
    with pytest.raises(RecipeError) as exc:
        build_plan(recipe)
    assert message in str(exc.value)


def test_a_slices_recipe_on_a_multi_module_model_is_refused(llava):
    recipe = parse_recipe({"merge_method": "passthrough", "slices": [{"sources": [src(llava["ft1"], 0, 2)]}]})
    with pytest.raises(RecipeError, match="a model of several modules .*write a modules: recipe with one entry per"):
        build_plan(recipe)


def test_models_of_two_checkpoint_layouts_in_one_module_are_refused(llava, tmp_path):
    legacy = save_llava(tmp_path / "legacy", load_folder(llava["ft2"]), legacy=True)
    recipe = parse_recipe({"merge_method": "linear", "modules": _modules(
        llava, **{TEXT: {"slices": [{"sources": [src(llava["ft1"], 0, 3), src(legacy, 0, 3)]}]}})})
    with pytest.raises(RecipeError, match=f"modules.{TEXT}: the models name this module's layers differently"):
        build_plan(recipe)


def test_a_models_recipe_runs_each_gradient_over_its_own_stack_as_mergekit(llava, merge_both):
    # mergekit turns `models:` into every module with those models: a depth gradient runs over the text
    # decoder's 3 layers and, separately, over the vision encoder's 2
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(llava["ft1"])}, {"model": str(llava["ft2"]), "parameters": {"weight": [0.1, 0.9]}}],
              "parameters": {"weight": 0.5}}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="LLaVA models: with a gradient")
    ft1, ft2 = load_folder(llava["ft1"]), load_folder(llava["ft2"])
    name = f"{VISION}.1.mlp.fc1.weight"  # the last vision layer: weight 0.9 for ft2
    assert torch.allclose(dw[name], (0.5 * ft1[name] + 0.9 * ft2[name]) / 1.4, atol=1e-6)
    assert layer_counts(out) == (3, 2)


def test_llava_next_has_the_same_modules(tmp_path, merge_both):
    # LLaVA-NeXT adds model.image_newline (a tensor of default) to LLaVA's layout
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = llava_config().to_dict()
    config = LlavaNextConfig(text_config=config["text_config"], vision_config=config["vision_config"], image_token_index=63,
                             image_grid_pinpoints=[[8, 8]], tie_word_embeddings=False)
    config.architectures = ["LlavaNextForConditionalGeneration"]
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folder = tmp_path / f"next{seed}"
        folder.mkdir()
        config.save_pretrained(folder)
        state = LlavaNextForConditionalGeneration(config).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    recipe = {"merge_method": "passthrough", "dtype": "float32", "modules": {
        "default": {"slices": [{"sources": [src(folders[1], 0, 0)]}]},
        TEXT: {"slices": [{"sources": [src(folders[0], 0, 3)]}, {"sources": [src(folders[1], 2, 3)]}]},
        VISION: {"slices": [{"sources": [src(folders[0], 1, 2)]}]},
    }}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="LLaVA-NeXT frankenmerge")
    assert torch.equal(dw["model.image_newline"], load_folder(folders[1])["model.image_newline"])
    assert layer_counts(out) == (4, 1)
    loads_whole(LlavaNextForConditionalGeneration, out)
