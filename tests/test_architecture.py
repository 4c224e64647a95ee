"""Tensor roles (deltawise.architecture) on real transformers tensor names, and the former per-module rules."""

from __future__ import annotations

import re

import pytest

from deltawise.architecture import Role, architecture_for

SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=64)


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


@pytest.fixture(scope="module")
def real():
    """Configs and tensor names/shapes of tiny Llama, BERT and GPT-2 models made by transformers."""
    import transformers as T

    llama = T.LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=False)
    bert = T.BertConfig(**SMALL)
    gpt2 = T.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    return {
        "llama_lm": (llama, _shapes(T.LlamaForCausalLM(llama))),
        "llama_cls": (llama, _shapes(T.LlamaForSequenceClassification(llama))),
        "bert_cls": (bert, _shapes(T.BertForSequenceClassification(bert))),
        "bert_base": (bert, _shapes(T.BertModel(bert))),  # as sentence-transformers saves MiniLM: no prefix
        "bert_mlm": (bert, _shapes(T.BertForMaskedLM(bert))),
        "gpt2_lm": (gpt2, _shapes(T.GPT2LMHeadModel(gpt2))),
    }


def _roles_of(config, shapes) -> dict[str, str]:
    roles = architecture_for(config)
    return {n: roles.role(n).value for n in shapes}


def test_llama_roles(real):
    config, shapes = real["llama_lm"]
    assert {n: r for n, r in _roles_of(config, shapes).items() if ".layers.1." not in n} == {
        "model.embed_tokens.weight": "embedding",
        "model.layers.0.self_attn.q_proj.weight": "attention",
        "model.layers.0.self_attn.k_proj.weight": "attention",
        "model.layers.0.self_attn.v_proj.weight": "attention",
        "model.layers.0.self_attn.o_proj.weight": "attention",
        "model.layers.0.mlp.gate_proj.weight": "mlp",
        "model.layers.0.mlp.up_proj.weight": "mlp",
        "model.layers.0.mlp.down_proj.weight": "mlp",
        "model.layers.0.input_layernorm.weight": "norm",
        "model.layers.0.post_attention_layernorm.weight": "norm",
        "model.norm.weight": "norm",
        "lm_head.weight": "lm_head",
    }
    assert _roles_of(*real["llama_cls"])["score.weight"] == "classifier"


def test_bert_roles(real):
    config, shapes = real["bert_cls"]
    roles = _roles_of(config, shapes)
    expected = {
        "bert.embeddings.word_embeddings.weight": "embedding",
        "bert.embeddings.position_embeddings.weight": "position_embedding",
        "bert.embeddings.token_type_embeddings.weight": "position_embedding",
        "bert.embeddings.LayerNorm.weight": "norm",
        "bert.embeddings.LayerNorm.bias": "norm",
        "bert.encoder.layer.1.attention.self.query.weight": "attention",
        "bert.encoder.layer.1.attention.self.query.bias": "bias",
        "bert.encoder.layer.1.attention.output.dense.weight": "attention",
        "bert.encoder.layer.1.attention.output.LayerNorm.weight": "norm",
        "bert.encoder.layer.1.intermediate.dense.weight": "mlp",
        "bert.encoder.layer.1.output.dense.weight": "mlp",
        "bert.encoder.layer.1.output.dense.bias": "bias",
        "bert.encoder.layer.1.output.LayerNorm.bias": "norm",
        "bert.pooler.dense.weight": "other",
        "bert.pooler.dense.bias": "bias",
        "classifier.weight": "classifier",
        "classifier.bias": "classifier",
    }
    assert {n: roles[n] for n in expected} == expected
    bare = _roles_of(*real["bert_base"])
    assert bare["embeddings.word_embeddings.weight"] == "embedding"
    assert bare["encoder.layer.0.attention.self.key.weight"] == "attention"
    mlm = _roles_of(*real["bert_mlm"])
    assert mlm["cls.predictions.decoder.weight"] == "lm_head"
    assert mlm["cls.predictions.transform.dense.weight"] == "other"


def test_gpt2_roles(real):
    config, shapes = real["gpt2_lm"]
    roles = _roles_of(config, shapes)
    expected = {
        "transformer.wte.weight": "embedding",
        "transformer.wpe.weight": "position_embedding",
        "transformer.h.0.ln_1.weight": "norm",
        "transformer.h.0.attn.c_attn.weight": "attention",
        "transformer.h.0.attn.c_proj.weight": "attention",
        "transformer.h.0.attn.c_proj.bias": "bias",
        "transformer.h.0.ln_2.bias": "norm",
        "transformer.h.0.mlp.c_fc.weight": "mlp",
        "transformer.h.0.mlp.c_proj.weight": "mlp",
        "transformer.ln_f.weight": "norm",
        "lm_head.weight": "lm_head",
    }
    assert {n: roles[n] for n in expected} == expected
    gpt2 = architecture_for(config)
    assert gpt2.is_linear_weight("transformer.h.0.attn.c_attn.weight", (16, 48))  # Conv1D, stored in x out
    assert not gpt2.is_linear_weight("transformer.wpe.weight", (32, 16))


@pytest.mark.parametrize(("model_type", "name", "role"), [
    ("gpt_neox", "gpt_neox.embed_in.weight", Role.EMBEDDING),
    ("gpt_neox", "embed_out.weight", Role.LM_HEAD),  # the output head, not an embedding
    ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value.weight", Role.ATTENTION),
    ("gpt_neox", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight", Role.MLP),
    ("gpt_neox", "gpt_neox.final_layer_norm.weight", Role.NORM),
    ("distilbert", "distilbert.transformer.layer.0.attention.q_lin.weight", Role.ATTENTION),
    ("distilbert", "distilbert.transformer.layer.0.ffn.lin1.weight", Role.MLP),
    ("distilbert", "distilbert.transformer.layer.0.sa_layer_norm.weight", Role.NORM),
    ("distilbert", "pre_classifier.weight", Role.CLASSIFIER),  # random at init, like classifier
    ("distilbert", "vocab_projector.weight", Role.LM_HEAD),
    ("roberta", "lm_head.decoder.weight", Role.LM_HEAD),
    ("roberta", "lm_head.dense.weight", Role.OTHER),
    ("roberta", "classifier.out_proj.weight", Role.CLASSIFIER),
    ("phi3", "model.layers.3.self_attn.qkv_proj.weight", Role.ATTENTION),
    ("phi3", "model.layers.3.mlp.gate_up_proj.weight", Role.MLP),
    ("gemma2", "model.layers.0.pre_feedforward_layernorm.weight", Role.NORM),
    ("qwen2", "model.layers.0.self_attn.q_proj.bias", Role.BIAS),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert.gate_proj.weight", Role.MLP),  # "shared" is T5's embedding only
    ("opt", "model.decoder.embed_positions.weight", Role.POSITION_EMBEDDING),
    ("opt", "model.decoder.layers.1.fc1.weight", Role.MLP),
])
def test_table_roles(model_type, name, role):
    assert architecture_for({"model_type": model_type}).role(name) == role


@pytest.mark.parametrize("config", [None, {}, {"model_type": "brand_new_arch"}])
def test_fallback_without_a_known_model_type(config):
    roles = architecture_for(config)
    assert roles.table is None
    assert roles.role("model.embed_tokens.weight") == Role.EMBEDDING
    assert roles.role("shared.weight") == Role.EMBEDDING  # T5
    assert roles.role("encoder.embed_positions.weight") == Role.POSITION_EMBEDDING
    assert roles.role("text_model.embeddings.position_embedding.weight") == Role.POSITION_EMBEDDING  # CLIP, by name
    assert roles.role("lm_head.weight") == Role.LM_HEAD
    assert roles.role("score.weight") == Role.CLASSIFIER
    assert roles.role("blocks.2.attn.qkv.weight") == Role.ATTENTION
    assert roles.role("blocks.2.mlp.fc1.weight") == Role.MLP
    assert roles.role("blocks.2.norm1.bias") == Role.NORM
    assert roles.role("encoder.embedding_hidden_mapping_in.weight") == Role.OTHER  # ALBERT: a Linear, not a table
    assert roles.is_linear_weight("encoder.embedding_hidden_mapping_in.weight", (16, 8))
    assert roles.layer_index("encoder.block.3.layer.1.DenseReluDense.wi.weight") == 3
    assert roles.layer_index("net.2.weight") == 2 and roles.layer_index("2.weight") is None
    assert roles.tied_alias("lm_head.weight", {"transformer.wte.weight"}) == "transformer.wte.weight"


def test_layer_indices(real):
    for key in ("llama_lm", "bert_cls", "bert_base", "gpt2_lm"):
        config, shapes = real[key]
        roles = architecture_for(config)
        indices = {n: roles.layer_index(n) for n in shapes}
        assert {i for i in indices.values() if i is not None} == {0, 1}, key
        # everything numbered sits in a layer; embeddings, final norms and heads do not
        assert all((i is None) == (re.search(r"\.\d+\.", n) is None) for n, i in indices.items()), key
        assert roles.num_layers(shapes) == 2
    roles = architecture_for({"model_type": "llama"})
    assert roles.layer_split("model.layers.12.mlp.up_proj.weight") == ("model.layers.12", 12, "mlp.up_proj.weight")
    assert roles.layer_split("layers.3.self_attn.q_proj.weight") == ("layers.3", 3, "self_attn.q_proj.weight")
    assert roles.layer_index("model.layers.3.mlp.experts.7.w1.weight") == 3
    assert architecture_for({"model_type": "llama", "num_hidden_layers": 30}).num_layers([]) == 30
    assert architecture_for({"n_layer": 5}).num_layers([]) == 5
    assert architecture_for(None).num_layers(["a.weight"]) is None


def test_tied_aliases():
    tied = architecture_for({"model_type": "llama", "tie_word_embeddings": True})
    untied = architecture_for({"model_type": "llama", "tie_word_embeddings": False})
    stored = {"model.embed_tokens.weight", "model.norm.weight"}
    assert tied.tied_alias("lm_head.weight", stored) == "model.embed_tokens.weight"
    assert untied.tied_alias("lm_head.weight", stored) is None
    assert tied.tied_alias("model.norm.weight", stored) is None  # only output heads alias
    assert architecture_for({"model_type": "llama"}).tied_alias("lm_head.weight", stored)  # missing key: transformers' default
    assert tied.is_tied_output("lm_head.weight") and not untied.is_tied_output("lm_head.weight")
    assert not tied.is_tied_output("model.embed_tokens.weight")
    assert not architecture_for({"model_type": "bert"}).is_tied_output("cls.predictions.decoder.bias")  # biases are stored
    gpt2 = architecture_for({"model_type": "gpt2"})
    assert gpt2.tied_alias("lm_head.weight", {"transformer.wte.weight"}) == "transformer.wte.weight"
    neox = architecture_for({"model_type": "gpt_neox", "tie_word_embeddings": True})
    assert neox.tied_alias("embed_out.weight", {"gpt_neox.embed_in.weight"}) == "gpt_neox.embed_in.weight"
    assert "embed_out.weight" in neox.tied_outputs() and "lm_head.weight" in neox.tied_outputs()


def test_works_from_a_model_config_object(real):
    import transformers as T

    config = T.LlamaConfig(**SMALL, tie_word_embeddings=True)
    roles = architecture_for(config)
    assert roles.model_type == "llama" and roles.ties_embeddings and roles.num_layers([]) == 2
    assert architecture_for(real["llama_lm"][0]).ties_embeddings is False


# --- the rules each call site used before deltawise.architecture, copied verbatim as the reference ---

OLD_LORA_EMBEDDING = re.compile(
    r"(embed_tokens|word_embeddings|wte|wpe|embed_in|embed_positions|shared|position_embeddings|token_type_embeddings)\.weight$")
OLD_OPCM_EMBEDDING = re.compile(r"(embed|wte|wpe|shared)", re.IGNORECASE)
OLD_PLAN_EMBEDDING = re.compile(r"(embed_tokens|word_embeddings|wte|lm_head|embed_in|embed_out|shared)\.weight$")
OLD_TIED = ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight", "embed_tokens.weight")
OLD_HFT_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|blocks)\.(\d+))\.(.+)$")
OLD_PARAMS_LAYER = re.compile(r"\.(\d+)\.")
OLD_LLAMA = re.compile(r"^(.*layers\.(\d+)\.)self_attn\.q_proj\.weight$")
OLD_BERT = re.compile(r"^(.*layer\.(\d+)\.)attention\.self\.query\.weight$")


def old_hft_category(rest: str) -> str:
    if "norm" in rest.lower():
        return "norm"
    if "attn" in rest or "attention" in rest:
        return "attention"
    return "ffn"


def test_former_call_sites_answer_as_before(real):
    from deltawise.adapt.methods.hft import _category
    from deltawise.analyze.intruders import is_analysed_matrix
    from deltawise.merge.methods.opcm import is_projected

    for key, (config, shapes) in real.items():
        roles = architecture_for(config)
        tied = bool(getattr(config, "tie_word_embeddings", True))
        for name, shape in shapes.items():
            where = f"{key}: {name}"
            module = name.rsplit(".", 1)[0]
            assert roles.is_linear_weight(name, shape) == (
                len(shape) == 2 and name.endswith(".weight") and not OLD_LORA_EMBEDDING.search(name)), where
            assert is_projected(name, shape, roles) == (len(shape) == 2 and not OLD_OPCM_EMBEDDING.search(name)), where
            old_intruders = len(shape) == 2 and min(shape) >= 2 and not any(
                t in name.lower() for t in ("embed", "lm_head", "wte", "wpe", "shared"))
            old_intruders = old_intruders and not name.startswith(("classifier.", "score.", "cls.predictions.decoder"))
            assert is_analysed_matrix(name, shape, roles) == old_intruders, where  # heads: see the next test
            mlm_decoder = name.startswith("cls.predictions.decoder.")  # BERT's LM head: now known as one
            assert roles.is_vocabulary(name) == (bool(OLD_PLAN_EMBEDDING.search(name)) or mlm_decoder), where
            others = set(shapes) - {name}  # a checkpoint that lacks this tensor
            old_alias = next((a for a in OLD_TIED if a in others), None) if tied and name == "lm_head.weight" else None
            if not mlm_decoder:
                assert roles.tied_alias(name, others) == old_alias, where
            old_layer = OLD_PARAMS_LAYER.search(name)
            assert roles.layer_index(name) == (int(old_layer.group(1)) if old_layer else None), where
            old_split = OLD_HFT_LAYER.match(name)
            assert roles.layer_split(name) == (
                (old_split.group(1), int(old_split.group(2)), old_split.group(3)) if old_split else None), where
            if old_split and not (key == "gpt2_lm" and ".ln_" in name):  # GPT-2's ln_1/ln_2 are norms now (were "ffn")
                assert _category(roles, name) == old_hft_category(old_split.group(3)), where
            old_head = name.split(".")[0] in ("score", "classifier")
            assert (roles.role(name) == Role.CLASSIFIER) == old_head, where
            assert (roles.role(f"{module}.weight") == Role.LM_HEAD) == (module.endswith("lm_head") or (
                module == "cls.predictions.decoder")), where
            assert roles.is_tied_output(name) == (tied and ("lm_head" in name or name == "cls.predictions.decoder.weight")), where
            for pattern, first in ((OLD_LLAMA, "self_attn.q_proj.weight"), (OLD_BERT, "attention.self.query.weight")):
                old = pattern.match(name)
                split = roles.layer_split(name)
                new = (f"{split[0]}.", str(split[1])) if split and split[2] == first else None
                assert new == ((old.group(1), old.group(2)) if old else None), where


def test_deliberate_changes():
    """The cases where the former lists disagreed; each is listed in the module docstring."""
    from deltawise.adapt.methods.hft import _category
    from deltawise.analyze.intruders import is_analysed_matrix
    from deltawise.merge.methods.opcm import is_projected

    gpt2 = architecture_for({"model_type": "gpt2"})
    assert _category(gpt2, "transformer.h.0.ln_1.weight") == "norm"  # was "ffn"
    bert = architecture_for({"model_type": "bert"})
    assert not is_analysed_matrix("classifier.weight", (3, 16), bert)  # output heads are not analysed, like lm_head
    assert is_analysed_matrix("bert.pooler.dense.weight", (16, 16), bert)
    neox = architecture_for({"model_type": "gpt_neox"})
    assert is_projected("embed_out.weight", (64, 16), neox)  # the untied output head, like lm_head
    moe = architecture_for({"model_type": "qwen2_moe"})
    assert is_projected("model.layers.0.mlp.shared_expert.up_proj.weight", (32, 16), moe)
    distil = architecture_for({"model_type": "distilbert"})
    assert distil.role("pre_classifier.bias") == Role.CLASSIFIER
    assert bert.tied_alias("cls.predictions.decoder.weight", {"bert.embeddings.word_embeddings.weight"})


def test_training_side_selections_match_the_former_rules():
    """head_names, target_linears and LIFT's linears on live models, against the former name rules."""
    import transformers as T
    from torch import nn

    from deltawise.adapt.methods.base import head_names, target_linears

    models = [
        T.LlamaForSequenceClassification(T.LlamaConfig(**SMALL, num_key_value_heads=1, pad_token_id=0)),
        T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=1)),
        T.BertForSequenceClassification(T.BertConfig(**SMALL)),
    ]
    for model in models:
        params = [n for n, _ in model.named_parameters()]
        assert head_names(model, "classification") == [n for n in params if n.split(".")[0] in ("score", "classifier")]
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        targets = ["q_proj", "v_proj", "query", "value", "lm_head", "dense"]
        old_targets = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets) and not n.endswith("lm_head")]
        assert sorted(target_linears(model, targets)) == sorted(old_targets)
        roles = architecture_for(model.config)
        old_lift = [n for n in linears if not n.endswith("lm_head") and n.split(".")[0] not in ("score", "classifier")]
        assert [n for n in linears if not roles.is_head(f"{n}.weight")] == old_lift
    assert "lm_head" not in target_linears(models[1], ["lm_head", "q_proj"])


def test_unstored_tied_heads_only_for_models_with_the_head():
    stored = {"model.embed_tokens.weight", "model.norm.weight"}
    causal = architecture_for({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert causal.unstored_tied_heads(stored) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert causal.unstored_tied_heads(stored | {"lm_head.weight"}) == {}  # stored: nothing to add
    unknown = architecture_for({"model_type": "llama"})
    assert unknown.unstored_tied_heads(stored) == {"lm_head.weight": "model.embed_tokens.weight"}  # unknown class
    for headless in (["LlamaModel"], ["LlamaForSequenceClassification"], ["LlamaModel", "LlamaForTokenClassification"]):
        roles = architecture_for({"model_type": "llama", "architectures": headless})
        assert not roles.has_output_head() and roles.unstored_tied_heads(stored) == {}, headless
    bert = {"embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"}
    body = architecture_for({"model_type": "bert", "architectures": ["BertModel"]})
    assert body.unstored_tied_heads(bert) == {}  # a sentence-embedding body (MiniLM) has no cls.predictions
    mlm = architecture_for({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    assert "cls.predictions.decoder.weight" in mlm.unstored_tied_heads(bert)
    untied = architecture_for({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False})
    assert untied.unstored_tied_heads(stored) == {}
