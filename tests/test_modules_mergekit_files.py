"""``modules:`` recipes with the module names of mergekit 0.1.5's architecture files run unchanged.

mergekit reads Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE), Gemma3 and Mistral3 through
mergekit/_data/architectures/{qwen2_vl,qwen2_5_vl,qwen3_vl_dense,qwen3_vl,gemma3vl,mistral3}.json: modules
``text_decoder``, ``vision_tower``, ``multi_modal_projector``, each owning the weights under its prefix
(deltawise.architecture.FILE_TABLES). Those files name transformers 4 (hub) keys (Qwen3-VL's: its one layout,
transformers 5's), on which mergekit runs: there one recipe file goes through mergekit and deltawise and every
tensor is compared. On transformers 5's layout mergekit stops; there the same recipe gives deltawise's hub-layout
tensors under the transformers 5 names (a property: the layout does not change the merge), and the output
loads whole in transformers.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from test_mergekit_compat import assert_not_a_copy, assert_same_tensors, load_folder, run_deltawise, write_recipe
from test_mergekit_compat import layer_source as src, merge_both  # noqa: F401 (merge_both: a fixture)
from test_modules_inferred import build, config_of, families, hub_name  # noqa: F401 (families: a fixture)
from test_modules_recipes import loads_whole

from deltawise.architecture import file_modules_for
from deltawise.errors import RecipeError
from deltawise.merge import build_plan, parse_recipe

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3", "mistral3"]
# mergekit's override_num_layers; 0 for the others (Qwen3-VL's: its 3 deepstack mergers, a stack of the projector)
PROJECTOR_LAYERS = {"qwen2_vl": 2, "qwen2_5_vl": 2, "qwen3_vl": 3, "qwen3_vl_moe": 3}


def modules_recipe(f: dict, family: str, text_layers: int = 3) -> dict:
    """A linear merge per module: a text decoder of ``text_layers`` from two overlapping slices whose parameters
    differ (the final norm and LM head follow the last slice, the embeddings the first), the vision tower by
    ``models:`` with a depth gradient, the projector by one slice with its own weights. (mergekit 0.1.5 with
    transformers 5 cannot save a config whose text depth changed: its ``layer_types`` keep the old length.)"""
    p, n = PROJECTOR_LAYERS.get(family, 0), text_layers - 1
    return {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0}, "modules": {
        "text_decoder": {"slices": [{"sources": [src(f["ft1"], 0, 2), src(f["ft2"], 0, 2)]},
                                    {"sources": [src(f["ft1"], 1, n, weight=3.0), src(f["ft2"], 1, n)]}]},
        "vision_tower": {"models": [{"model": str(f["ft1"])}, {"model": str(f["ft2"]), "parameters": {"weight": [0.1, 0.9]}}]},
        "multi_modal_projector": {"slices": [{"sources": [src(f["ft1"], 0, p), src(f["ft2"], 0, p, weight=[0.5, 2.0])]}]},
    }}


def models_recipe(f: dict) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(f["ft1"]), "parameters": {"weight": [0.2, 0.8]}},
                       {"model": str(f["ft2"]), "parameters": {"weight": 0.5}}]}


@pytest.mark.parametrize("family", FAMILIES)
def test_file_modules_match_mergekit_on_the_hub_layout(families, merge_both, family):
    f = families(family, hub=True)
    mk, dw, out = merge_both(modules_recipe(f, family))
    assert_same_tensors(mk, dw, label=f"{family} modules")
    ft1, ft2 = load_folder(f["ft1"]), load_folder(f["ft2"])
    assert_not_a_copy(dw, {"ft1": ft1, "ft2": ft2})
    # by hand: the final norm comes from the last slice (ft1 weighs 3), the embeddings from the first (1 and 1)
    norm, embed = (hub_name(family, f"model.language_model.{n}.weight") for n in ("norm", "embed_tokens"))
    assert torch.allclose(dw[norm], (3 * ft1[norm] + ft2[norm]) / 4, atol=1e-6)
    assert torch.allclose(dw[embed], (ft1[embed] + ft2[embed]) / 2, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_models_recipe_depths_match_mergekit_on_the_hub_layout(families, merge_both, family):
    # each module its own depth gradient; Qwen's projector MLP is planned once per of its 2 "layers": t = 1
    f = families(family, hub=True)
    mk, dw, _ = merge_both(models_recipe(f))
    assert_same_tensors(mk, dw, label=f"{family} models")
    ft1, ft2 = load_folder(f["ft1"]), load_folder(f["ft2"])
    if family in ("qwen2_vl", "qwen2_5_vl"):
        name = "visual.merger.mlp.0.weight"
        assert torch.allclose(dw[name], (0.8 * ft1[name] + 0.5 * ft2[name]) / 1.3, atol=1e-6)
    if family.startswith("qwen3"):  # deepstack merger 1 of 3: t = 0.5, ft1 weighs 0.5 as ft2
        name = "model.visual.deepstack_merger_list.1.linear_fc1.weight"
        assert torch.allclose(dw[name], (ft1[name] + ft2[name]) / 2, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_file_modules_on_the_transformers5_layout_give_the_hub_layouts_tensors(families, tmp_path, family):
    hub, v5 = families(family, hub=True), families(family)
    # a 4-layer text decoder from 3 (which mergekit cannot save, see modules_recipe)
    ours = run_deltawise(write_recipe(tmp_path / "hub.yaml", modules_recipe(hub, family, 4)), tmp_path / "hub")
    dw = run_deltawise(write_recipe(tmp_path / "v5.yaml", modules_recipe(v5, family, 4)), tmp_path / "v5")
    assert {hub_name(family, name): tensor for name, tensor in dw.items()}.keys() == ours.keys()
    for name, tensor in dw.items():
        assert torch.equal(tensor, ours[hub_name(family, name)]), name
    loads_whole(build(family)[1], tmp_path / "v5")
    for folder in (tmp_path / "hub", tmp_path / "v5"):
        assert config_of(folder)["text_config"]["num_hidden_layers"] == 4
    if family == "qwen2_vl":  # the hub config's top-level count (mergekit's num_layers_config_key) follows
        assert config_of(tmp_path / "hub")["num_hidden_layers"] == 4


def test_file_module_names_are_checked(families):
    f = families("qwen2_vl")
    recipe = modules_recipe(f, "qwen2_vl")
    # a module name of neither set, and the two sets mixed
    for bad, extra in (("vision_encoder", {}), ("model.visual.blocks", {})):
        modules = {**recipe["modules"], bad: recipe["modules"]["vision_tower"]}
        with pytest.raises(RecipeError) as exc:
            build_plan(parse_recipe({**recipe, "modules": modules, **extra}))
        assert (f"modules.{bad}: Qwen2VLForConditionalGeneration has no module {bad!r} in mergekit's qwen2_vl.json; "
                f"its modules are text_decoder, vision_tower, multi_modal_projector") in str(exc.value)
    modules = {k: v for k, v in recipe["modules"].items() if k != "multi_modal_projector"}
    with pytest.raises(RecipeError) as exc:
        build_plan(parse_recipe({**recipe, "modules": modules}))
    assert "the recipe lacks multi_modal_projector" in str(exc.value)
    # a model without an architecture file: the inferred names are its modules, and the message says which
    p = families("paligemma")
    recipe = {"merge_method": "passthrough", "modules": {
        "default": {"slices": [{"sources": [src(p["ft1"], 0, 0)]}]},
        "text_decoder": {"slices": [{"sources": [src(p["ft1"], 0, 3)]}]},
        "model.vision_tower.encoder.layers": {"slices": [{"sources": [src(p["ft1"], 0, 2)]}]}}}
    with pytest.raises(RecipeError) as exc:
        build_plan(parse_recipe(recipe))
    assert ("modules.text_decoder: PaliGemmaForConditionalGeneration has no module 'text_decoder'; its modules are "
            "default, model.language_model.layers, model.vision_tower.encoder.layers") in str(exc.value)
    # a Qwen2-VL recipe by the inferred names still names the file's modules as the alternative
    recipe = {"merge_method": "passthrough", "modules": {"text": {"slices": [{"sources": [src(f["ft1"], 0, 3)]}]}}}
    with pytest.raises(RecipeError) as exc:
        build_plan(parse_recipe(recipe))
    assert "(or mergekit's text_decoder, vision_tower, multi_modal_projector, from its qwen2_vl.json)" in str(exc.value)


def test_every_tensor_has_one_file_module(families):
    # property: in both layouts each tensor of each family belongs to exactly the module its hub name's prefix says
    for family in FAMILIES:
        for hub in (False, True):
            folder = families(family, hub=hub)["base"]
            names = list(load_folder(folder))
            table = file_modules_for(config_of(folder), names)
            assert table is not None, (family, hub)
            owners = {name: table.module_of(name) for name in names}
            assert all(owners.values()), [n for n, m in owners.items() if m is None]
            for name, module in owners.items():
                assert module is table.module_of(hub_name(family, name) if not hub else name)
    config = config_of(families("qwen2_vl")["base"])  # names in neither layout: no file modules
    assert file_modules_for(config, ["transformer.h.0.w", "vision.blocks.0.w"]) is None


def test_a_tensor_outside_the_file_modules_is_refused(families, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(families("mistral3")["ft1"], folder)
    state = load_folder(folder)
    save_file({**state, "extra.scale": torch.ones(2)}, str(folder / "model.safetensors"))
    recipe = modules_recipe({"ft1": folder, "ft2": families("mistral3")["ft2"]}, "mistral3")
    with pytest.raises(RecipeError) as exc:
        build_plan(parse_recipe(recipe))
    assert ("1 tensor(s) (extra.scale) belong to none of the modules of mergekit's mistral3.json (text_decoder, "
            "vision_tower, multi_modal_projector)") in str(exc.value)


def test_qwen3_vl_deepstack_mergers_keep_their_count(families):
    # the projector's layers are the 3 deepstack mergers (mergekit's override_num_layers); no config key holds
    # their count (vision_config.deepstack_visual_indexes is a list), so a recipe may reorder them, not resize them
    f = families("qwen3_vl")
    recipe = modules_recipe(f, "qwen3_vl")
    reordered = {"slices": [{"sources": [src(f["ft2"], 1, 3)]}, {"sources": [src(f["ft1"], 0, 1)]}]}
    plan = build_plan(parse_recipe({**recipe, "modules": {**recipe["modules"], "multi_modal_projector": reordered}}))
    merger = {t.name: (t.inputs[0].ref, t.sources[0]) for t in plan.tensors if ".deepstack_merger_list." in t.name}
    assert len(merger) == 3 * 6
    name = "model.visual.deepstack_merger_list.{}.norm.weight"
    assert [merger[name.format(i)] for i in range(3)] == [(str(f["ft2"]), name.format(1)), (str(f["ft2"]), name.format(2)),
                                                           (str(f["ft1"]), name.format(0))]
    resized = {"slices": [{"sources": [src(f["ft1"], 0, 3)]}, {"sources": [src(f["ft2"], 2, 3)]}]}
    with pytest.raises(RecipeError) as exc:
        build_plan(parse_recipe({**recipe, "modules": {**recipe["modules"], "multi_modal_projector": resized}}))
    assert (f"modules.multi_modal_projector: the output has 4 layers in this stack, {f['ft1']} 3, but no config key "
            f"can be told to hold its count (mergekit's qwen3_vl files fix the deepstack mergers at 3") in str(exc.value)
