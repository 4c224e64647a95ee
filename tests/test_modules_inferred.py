"""``modules:`` recipes on multi-module models beyond LLaVA: modules inferred from tensor names, as mergekit does.

mergekit 0.1.5 has no architecture file for PaliGemma, Idefics3/SmolVLM or Mllama and infers their modules
(mergekit/architecture/auto.py): one per layer stack, named by the path before a tensor's first ``.<digits>.``,
and ``default`` for everything else. deltawise infers the same (deltawise.architecture.modules_for) and finds
each stack's count key in the config by its value. Tiny random models (transformers 5 layout) are merged by
mergekit itself and by deltawise from one recipe file and every tensor is compared; the output config's layer
counts (which mergekit leaves as they were) are checked by hand, and the output loads whole in transformers.
mergekit 0.1.5 does not run these recipes on Qwen2-VL, Qwen2.5-VL (transformers 5 layout), Gemma3 or Mistral3
(its architecture files name transformers 4 keys), so Qwen2-VL is checked on deltawise alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_mergekit_compat import assert_not_a_copy, assert_same_tensors, load_folder, run_deltawise, write_recipe
from test_mergekit_compat import layer_source as src, merge_both  # noqa: F401 (merge_both: a fixture)
from test_modules_recipes import loads_whole

from deltawise.architecture import count_keys, infer_stacks, modules_for
from deltawise.errors import RecipeError
from deltawise.merge import build_plan, parse_recipe

TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2)
VISION = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=2)


def build(family: str):
    """(config, model class) of a tiny random model of ``family``."""
    import transformers as tf

    if family == "paligemma":
        config = tf.PaliGemmaConfig(text_config=dict(TEXT, model_type="gemma", num_key_value_heads=1, head_dim=8),
                                    vision_config=dict(VISION, projection_dim=16), image_token_index=63, projection_dim=16)
        cls = tf.PaliGemmaForConditionalGeneration
    elif family in ("idefics3", "smolvlm"):
        config_cls = tf.Idefics3Config if family == "idefics3" else tf.SmolVLMConfig
        config = config_cls(text_config=dict(TEXT, model_type="llama"), vision_config=VISION, scale_factor=2,
                            image_token_id=63)
        cls = tf.Idefics3ForConditionalGeneration if family == "idefics3" else tf.SmolVLMForConditionalGeneration
    elif family == "mllama":
        config = tf.MllamaConfig(text_config=dict(TEXT, num_hidden_layers=4, cross_attention_layers=[1]),
                                 vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                                    num_global_layers=1, attention_heads=2, image_size=8, patch_size=2,
                                                    max_num_tiles=4, vision_output_dim=16, intermediate_layers_indices=[0]),
                                 image_token_index=63)
        config.text_config.pad_token_id = None
        cls = tf.MllamaForConditionalGeneration
    elif family == "qwen2_vl":
        config = tf.Qwen2VLConfig(text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                                  vision_config=dict(depth=2, embed_dim=8, hidden_size=16, num_heads=2, mlp_ratio=2,
                                                     patch_size=2, temporal_patch_size=1, spatial_merge_size=1),
                                  image_token_id=63, video_token_id=62, vision_start_token_id=61)
        cls = tf.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        config = tf.Qwen2_5_VLConfig(text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                                     vision_config=dict(depth=2, hidden_size=8, intermediate_size=16, out_hidden_size=16,
                                                        num_heads=2, patch_size=2, temporal_patch_size=1,
                                                        spatial_merge_size=1, fullatt_block_indexes=[1], window_size=4),
                                     image_token_id=63, video_token_id=62, vision_start_token_id=61)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif family in ("qwen3_vl", "qwen3_vl_moe"):  # 3 deepstack mergers: mergekit's files plan exactly 3
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, decoder_sparse_step=1)
        config_cls = tf.Qwen3VLConfig if family == "qwen3_vl" else tf.Qwen3VLMoeConfig
        config = config_cls(text_config=dict(TEXT, head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]},
                                             **(moe if family == "qwen3_vl_moe" else {})),
                            vision_config=dict(depth=3, hidden_size=8, intermediate_size=16, out_hidden_size=16, num_heads=2,
                                               patch_size=2, temporal_patch_size=1, spatial_merge_size=1,
                                               num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2]),
                            image_token_id=63, video_token_id=62, vision_start_token_id=61, vision_end_token_id=60)
        cls = tf.Qwen3VLForConditionalGeneration if family == "qwen3_vl" else tf.Qwen3VLMoeForConditionalGeneration
    elif family == "gemma3":
        config = tf.Gemma3Config(text_config=dict(TEXT, num_key_value_heads=1, head_dim=8, sliding_window=4),
                                 vision_config=dict(VISION, vision_use_head=False), mm_tokens_per_image=4,
                                 image_token_index=63, boi_token_index=62, eoi_token_index=61)
        cls = tf.Gemma3ForConditionalGeneration
    elif family == "mistral3":
        config = tf.Mistral3Config(text_config=dict(TEXT, model_type="mistral", head_dim=8),
                                   vision_config=dict(VISION, head_dim=4), image_token_index=63, spatial_merge_size=1)
        cls = tf.Mistral3ForConditionalGeneration
    else:
        raise ValueError(family)
    config.architectures = [cls.__name__]
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    return config, cls


# transformers 4's (the hub's) names of these models, from transformers 5's: the names mergekit's architecture files use
# (Qwen3-VL's hub checkpoints already have transformers 5's names)
HUB_NAMES = {
    "qwen3_vl": (), "qwen3_vl_moe": (),
    "qwen2_vl": (("model.language_model.", "model."), ("model.visual.", "visual.")),
    "qwen2_5_vl": (("model.language_model.", "model."), ("model.visual.", "visual.")),
    "gemma3": (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")),
    "mistral3": (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                 ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")),
}


def hub_name(family: str, name: str) -> str:
    """A tensor's name in the hub's layout of ``family``, from its transformers 5 name."""
    old, new = next(((a, b) for a, b in HUB_NAMES[family] if name.startswith(a)), ("", ""))
    return new + name[len(old):]


def save_family(root: Path, family: str, hub: bool = False) -> dict[str, Path]:
    """A tiny ``family`` base and two fine-tunes (base + noise), as transformers 5 holds them in memory, or with
    ``hub`` under the hub's names (:data:`HUB_NAMES`; Qwen2-VL's text settings also at the config's top level)."""
    config, cls = build(family)
    torch.manual_seed(3)
    base = {k: v.detach().clone() for k, v in cls(config).state_dict().items()}
    out = {}
    for key, seed in (("base", 0), ("ft1", 1), ("ft2", 2)):
        gen = torch.Generator().manual_seed(seed)
        folder = root / f"{family}{'_hub' if hub else ''}_{key}"
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
        if hub and family == "qwen2_vl":  # mergekit's qwen2_vl.json counts text layers by the top-level key
            saved = json.loads((folder / "config.json").read_text())
            top = {k: v for k, v in saved["text_config"].items() if k != "layer_types"}  # (as transformers 4 wrote it)
            (folder / "config.json").write_text(json.dumps({**top, **saved}))
        state = {(hub_name(family, k) if hub else k):
                 (v + 0.05 * torch.randn(v.shape, generator=gen) if seed and v.is_floating_point() else v).contiguous()
                 for k, v in base.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        out[key] = folder
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    made: dict[tuple[str, bool], dict[str, Path]] = {}

    def get(family: str, hub: bool = False) -> dict[str, Path]:
        if (family, hub) not in made:
            made[family, hub] = save_family(root, family, hub)
        return made[family, hub]

    return get


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def counts(folder: Path, *keys: str) -> tuple:
    config = config_of(folder)
    return tuple(config[key.split(".")[0]][key.split(".")[1]] for key in keys)


def test_stacks_and_count_keys_are_inferred_per_family(families):
    # the modules mergekit infers (its names), each with the config key holding its count
    expected = {
        "paligemma": {"model.language_model.layers": "text_config.num_hidden_layers",
                      "model.vision_tower.encoder.layers": "vision_config.num_hidden_layers"},
        "idefics3": {"model.text_model.layers": "text_config.num_hidden_layers",
                     "model.vision_model.encoder.layers": "vision_config.num_hidden_layers"},
        "mllama": {"model.language_model.layers": "text_config.num_hidden_layers",
                   "model.vision_model.global_transformer.layers": "vision_config.num_global_layers",
                   "model.vision_model.transformer.layers": "vision_config.num_hidden_layers"},
        "qwen2_vl": {"model.language_model.layers": "text_config.num_hidden_layers",
                     "model.visual.blocks": "vision_config.depth",
                     "model.visual.merger.mlp": None},  # mlp.0 and mlp.2 of a Sequential: no config count
    }
    for family, keys in expected.items():
        folder = families(family)["base"]
        modules = modules_for(config_of(folder), load_folder(folder))
        assert {s.name: s.count_key for s in modules.stacks} == keys, family
        for stack in modules.stacks:  # property: a key found holds the count the names show
            if stack.count_key:
                section, leaf = stack.count_key.split(".")
                assert config_of(folder)[section][leaf] == stack.layers
    assert modules_for(config_of(families("qwen2_vl")["base"]), load_folder(families("qwen2_vl")["base"])).stack(
        "model.visual.merger.mlp").unresolved == "text_config.num_hidden_layers hold 3 but none shares a word with its path"


def test_count_keys_by_hand():
    config = {"text_config": {"num_hidden_layers": 4}, "vision_config": {"num_hidden_layers": 4, "num_global_layers": 2},
              "num_hidden_layers": 4}
    keys = count_keys({"model.language_model.layers": 4, "model.vision_model.transformer.layers": 4,
                       "model.vision_model.global_transformer.layers": 2, "model.decoder.blocks": 7}, config)
    assert keys == {
        "model.language_model.layers": ("text_config.num_hidden_layers", ""),
        "model.vision_model.transformer.layers": ("vision_config.num_hidden_layers", ""),
        "model.vision_model.global_transformer.layers": ("vision_config.num_global_layers", ""),
        "model.decoder.blocks": (None, "no config key (num_hidden_layers, num_layers, n_layer, n_layers, depth, "
                                       "num_global_layers, encoder_layers, decoder_layers, num_decoder_layers, top level "
                                       "or in a sub-config) holds its 7 layers"),
    }
    # two stacks of equal depth that no key names apart: neither is resolved
    tied = count_keys({"model.a_tower.layers": 2, "model.b_tower.layers": 2},
                      {"a_config": {"depth": 2}, "b_config": {"depth": 2}, "tower_config": {"num_layers": 2}})
    assert tied["model.a_tower.layers"] == (None, "a_config.depth and tower_config.num_layers both hold 2 and fit its "
                                                  "path alike")
    # one key that two stacks would take (a tiny Qwen3-VL: 3 vision blocks, 3 deepstack mergers): neither, in any order
    config = {"vision_config": {"depth": 3}}
    for order in (["model.visual.blocks", "model.visual.deepstack_merger_list"],
                  ["model.visual.deepstack_merger_list", "model.visual.blocks"]):
        keys = count_keys(dict.fromkeys(order, 3), config)
        assert [keys[path][0] for path in order] == [None, None], order
    assert infer_stacks(["model.layers.0.mlp.experts.3.w", "model.layers.11.w", "lm_head.weight"]) == {"model.layers": 12}


def test_paligemma_frankenmerge_per_module_matches_mergekit(families, merge_both):
    # text decoder: layers 0-1 of ft1 then 1-2 of ft2 (4 layers); vision encoder: ft2's layer 1 alone; the rest ft1's
    f = families("paligemma")
    text, vision = "model.language_model.layers", "model.vision_tower.encoder.layers"
    recipe = {"merge_method": "passthrough", "dtype": "float32", "modules": {
        "default": {"slices": [{"sources": [src(f["ft1"], 0, 0)]}]},
        text: {"slices": [{"sources": [src(f["ft1"], 0, 2)]}, {"sources": [src(f["ft2"], 1, 3)]}]},
        vision: {"slices": [{"sources": [src(f["ft2"], 1, 2)]}]},
    }}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="PaliGemma frankenmerge")
    ft1, ft2 = load_folder(f["ft1"]), load_folder(f["ft2"])
    assert torch.equal(dw[f"{text}.3.mlp.up_proj.weight"], ft2[f"{text}.2.mlp.up_proj.weight"])
    assert torch.equal(dw[f"{vision}.0.mlp.fc1.weight"], ft2[f"{vision}.1.mlp.fc1.weight"])
    assert torch.equal(dw["model.multi_modal_projector.linear.weight"], ft1["model.multi_modal_projector.linear.weight"])
    assert counts(out, "text_config.num_hidden_layers", "vision_config.num_hidden_layers") == (4, 1)
    from transformers import PaliGemmaForConditionalGeneration

    model = loads_whole(PaliGemmaForConditionalGeneration, out)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()


@pytest.mark.parametrize("family, text, vision", [
    ("idefics3", "model.text_model.layers", "model.vision_model.encoder.layers"),
    ("smolvlm", "model.text_model.layers", "model.vision_model.encoder.layers"),
])
def test_slerp_with_per_module_slices_and_parameters_matches_mergekit(families, merge_both, family, text, vision):
    # each module its own t: default by module parameters, the text stack by a gradient over two slices
    # (5 layers from 3), the vision stack by a slice parameter overriding its module's
    f = families(family)
    recipe = {"merge_method": "slerp", "base_model": str(f["ft1"]), "dtype": "float32", "parameters": {"t": 0.5},
              "modules": {
                  "default": {"models": [{"model": str(f["ft1"])}, {"model": str(f["ft2"])}], "parameters": {"t": 0.3}},
                  text: {"slices": [{"sources": [src(f["ft1"], 0, 3), src(f["ft2"], 0, 3)]},
                                    {"sources": [src(f["ft1"], 1, 3), src(f["ft2"], 1, 3)]}],
                         "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": [1, 0.2]}]}},
                  vision: {"slices": [{"sources": [src(f["ft1"], 0, 2), src(f["ft2"], 0, 2)], "parameters": {"t": 0.8}}],
                           "parameters": {"t": 0.1}},
              }}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label=f"{family} slerp")
    assert_not_a_copy(dw, {"ft1": load_folder(f["ft1"]), "ft2": load_folder(f["ft2"])})
    assert counts(out, "text_config.num_hidden_layers", "vision_config.num_hidden_layers") == (5, 2)
    import transformers

    loads_whole(getattr(transformers, build(family)[1].__name__), out)


def test_mllama_three_stacks_with_a_models_recipe_and_per_module_weights_match_mergekit(families, merge_both):
    # three stacks (text, vision, global vision); `models:` runs a depth gradient over each stack on its own
    f = families("mllama")
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(f["ft1"])}, {"model": str(f["ft2"]), "parameters": {"weight": [0.1, 0.9]}}],
              "parameters": {"weight": 0.5}}
    mk, dw, _ = merge_both(recipe)
    assert_same_tensors(mk, dw, label="Mllama models: with a gradient")
    ft1, ft2 = load_folder(f["ft1"]), load_folder(f["ft2"])
    name = "model.vision_model.transformer.layers.1.mlp.fc1.weight"  # the last of 2 vision layers: ft2 weighs 0.9
    assert torch.allclose(dw[name], (0.5 * ft1[name] + 0.9 * ft2[name]) / 1.4, atol=1e-6)
    name = "model.vision_model.global_transformer.layers.0.mlp.fc1.weight"  # a 1-layer stack: t = 1 (mergekit's rule)
    assert torch.allclose(dw[name], (0.5 * ft1[name] + 0.9 * ft2[name]) / 1.4, atol=1e-6)

    # a modules: recipe that repeats text layers 0-1 (cross-attention layer 1 moves along) and weighs each stack
    text = "model.language_model.layers"
    models = [{"model": str(f["ft1"])}, {"model": str(f["ft2"])}]
    recipe = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0}, "modules": {
        "default": {"models": models},
        text: {"slices": [{"sources": [src(f["ft1"], 0, 2), src(f["ft2"], 0, 2)]},
                          {"sources": [src(f["ft1"], 0, 4), src(f["ft2"], 0, 4)], "parameters": {"weight": 2.0}}]},
        "model.vision_model.transformer.layers": {"models": models, "parameters": {"weight": 3.0}},
        "model.vision_model.global_transformer.layers": {"models": [models[0], {**models[1], "parameters": {"weight": 0.0}}]},
    }}
    mk, dw, out = merge_both(recipe)
    assert_same_tensors(mk, dw, label="Mllama modules")
    assert torch.equal(dw["model.vision_model.global_transformer.layers.0.mlp.fc1.weight"],
                       ft1["model.vision_model.global_transformer.layers.0.mlp.fc1.weight"])
    config = config_of(out)
    assert config["text_config"]["num_hidden_layers"] == 6
    assert config["text_config"]["cross_attention_layers"] == [1, 3]  # output layers from source layer 1
    from transformers import MllamaForConditionalGeneration

    loads_whole(MllamaForConditionalGeneration, out)


def test_qwen2_vl_merges_where_mergekit_cannot(families, tmp_path):
    # mergekit 0.1.5 reads Qwen2-VL through its architecture file, whose count key (num_hidden_layers at the top
    # level) a transformers 5 config lacks: it stops. deltawise infers the stacks; the merger's Sequential
    # (mlp.0, mlp.2) is a stack with no count key, which may be merged but not resized
    f = families("qwen2_vl")
    text, vision, merger = "model.language_model.layers", "model.visual.blocks", "model.visual.merger.mlp"
    modules = {"default": {"slices": [{"sources": [src(f["ft2"], 0, 0)]}]},
               text: {"slices": [{"sources": [src(f["ft1"], 0, 3)]}, {"sources": [src(f["ft2"], 2, 3)]}]},
               vision: {"slices": [{"sources": [src(f["ft1"], 1, 2)]}]},
               merger: {"slices": [{"sources": [src(f["ft2"], 0, 3)]}]}}
    recipe = {"merge_method": "passthrough", "dtype": "float32", "modules": modules}
    dw = run_deltawise(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")
    ft1, ft2 = load_folder(f["ft1"]), load_folder(f["ft2"])
    assert torch.equal(dw[f"{text}.3.mlp.up_proj.weight"], ft2[f"{text}.2.mlp.up_proj.weight"])
    assert torch.equal(dw[f"{vision}.0.mlp.fc1.weight"], ft1[f"{vision}.1.mlp.fc1.weight"])
    assert torch.equal(dw[f"{merger}.2.weight"], ft2[f"{merger}.2.weight"])
    config = config_of(tmp_path / "out")
    assert (config["text_config"]["num_hidden_layers"], config["vision_config"]["depth"]) == (4, 1)
    assert len(config["text_config"]["layer_types"]) == 4
    from transformers import Qwen2VLForConditionalGeneration

    loads_whole(Qwen2VLForConditionalGeneration, tmp_path / "out")

    resized = {**modules, merger: {"slices": [{"sources": [src(f["ft2"], 0, 1)]}]}}
    with pytest.raises(RecipeError) as exc:
        build_plan(parse_recipe({"merge_method": "passthrough", "modules": resized}))
    assert (f"modules.{merger}: the output has 1 layers in this stack, {f['ft2']} 3, but no config key can be told to "
            f"hold its count (text_config.num_hidden_layers hold 3 but none shares a word with its path)") in str(exc.value)


def test_stacks_whose_count_keys_cannot_be_resolved_are_refused_when_resized(tmp_path):
    # two stacks of 2 layers, two sub-configs that hold 2 and name neither: nothing tells which count is whose
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["OddForConditionalGeneration"], "model_type": "odd",
        "a_config": {"num_hidden_layers": 2}, "b_config": {"num_hidden_layers": 2}}))
    gen = torch.Generator().manual_seed(0)
    state = {f"model.{stack}.{i}.w": torch.randn(3, 3, generator=gen) for stack in ("decoder", "encoder") for i in range(2)}
    save_file({**state, "head.weight": torch.randn(3, 3, generator=gen)}, str(folder / "model.safetensors"))
    modules = {"default": {"slices": [{"sources": [src(folder, 0, 0)]}]},
               "model.decoder": {"slices": [{"sources": [src(folder, 0, 2)]}]},
               "model.encoder": {"slices": [{"sources": [src(folder, 0, 2)]}]}}
    plan = build_plan(parse_recipe({"merge_method": "passthrough", "modules": modules}))  # depths kept: it runs
    assert {t.name for t in plan.tensors} == set(state) | {"head.weight"}
    resized = {**modules, "model.encoder": {"slices": [{"sources": [src(folder, 0, 2)]}, {"sources": [src(folder, 1, 2)]}]}}
    with pytest.raises(RecipeError) as exc:
        build_plan(parse_recipe({"merge_method": "passthrough", "modules": resized}))
    assert ("modules.model.encoder: the output has 3 layers in this stack" in str(exc.value)
            and "a_config.num_hidden_layers, b_config.num_hidden_layers hold 2 but none shares a word with its path"
            in str(exc.value))
