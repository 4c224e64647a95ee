"""Decides the role of each tensor of a transformer checkpoint: the one place that knows tensor names.

``roles = architecture_for(config)`` takes a config dict (``config.json`` as the merge side reads it),
a transformers ``model.config`` object (the training side) or ``None``, and answers per tensor name:
``roles.role(name)`` (a :class:`Role`), ``roles.layer_index(name)``, ``roles.is_embedding(name)``,
``roles.is_linear_weight(name, shape)``, ``roles.tied_alias(name, present)`` and a few more. Nothing
here imports torch: only names, shapes and config values are looked at.

How a role is decided (docs/merging.md, "Tensor roles"):

1. The config's ``model_type`` picks a table (:data:`TABLES`: Llama-like decoders, GPT-2, GPT-NeoX,
   OPT, BERT, RoBERTa, DistilBERT). A table names, as module names, the token embedding, the
   position/token-type tables, the LM head, the classification heads, the container of the layer
   stack, the attention and MLP blocks inside a layer, the norms, and the tied output/input pairs.
   Module names match the *end* of a tensor's module path (``embed_tokens`` matches
   ``model.embed_tokens.weight`` and a bare ``embed_tokens.weight``), except classification heads,
   which match its *first* component (``score``, ``classifier``: the heads sit on top of the model).
2. The names of :data:`FALLBACK` (the union of the tables' names, and all the former code knew)
   count for every model, so an unknown model type or a missing config still gets the usual names.
3. What neither names goes to generic rules: a module named like a norm (containing ``norm``, or
   ``ln_1``/``ln_f``-style) is a norm; one named like a lookup table (ending in ``embed``,
   ``embedding`` or ``embeddings``) is an embedding, a position table when it also says
   ``position``/``token_type``; inside a layer a path through ``attn``/``attention`` is attention,
   the rest MLP; outside the layers it is ``other`` (a pooler, a projector).

The checks run in this order: LM head, classification head, token embedding, position table, norm,
embedding by name, attention/MLP by the layer. A bias takes the role ``bias`` unless it belongs to
a norm or a head (heads and norms train and save whole, bias included); ``module_role`` gives the
role of the module a tensor belongs to, which keeps weight and bias together.

Layer index: the number right after the table's layer container (``layers``, ``layer``, ``h``);
with the fallback the first all-digit component that is neither the first nor the last one (the
rule mergekit-style depth gradients have always used here).

Tied output embeddings: an output head is tied to the input embedding when the config says
``tie_word_embeddings`` (missing means tied: transformers' ``PretrainedConfig`` default). The
checkpoint then stores only the input embedding; ``tied_alias`` finds it.

Where the former per-module lists disagreed, these are the rules now (each a deliberate choice):

- A "linear weight" is a 2-D tensor named ``*.weight`` that is not an embedding table (token,
  position or token-type) nor a norm; output heads (LM head, classifier) are linear weights, as are
  GPT-2's Conv1D weights (stored transposed; SVD-based uses do not care).
- Embeddings are recognised by module name, not by a substring anywhere in the path: ``shared``
  is T5's embedding only as a whole module name, so a Qwen2-MoE ``shared_expert`` is an MLP;
  ``embed_out`` (GPT-NeoX) is the LM head, not an embedding.
- The LM head is the table's output projection (``lm_head``, BERT's ``cls.predictions.decoder``,
  RoBERTa's ``lm_head.decoder``, DistilBERT's ``vocab_projector``, GPT-NeoX's ``embed_out``);
  RoBERTa's ``lm_head.dense`` is an ordinary linear layer.
- Classification heads are ``score`` and ``classifier`` plus DistilBERT's ``pre_classifier`` (also
  initialised at random when a classifier is made from a base model, so it must train).
- GPT-2's ``ln_1``/``ln_2``/``ln_f`` are norms.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Optional


class Role(str, Enum):
    """What a tensor is, as far as merging, extraction, training and analysis care."""

    EMBEDDING = "embedding"  # token embedding: one row per vocabulary entry
    POSITION_EMBEDDING = "position_embedding"  # position and token-type tables
    LM_HEAD = "lm_head"  # output projection onto the vocabulary (weight and bias)
    CLASSIFIER = "classifier"  # task head on top of the model (all its parameters)
    ATTENTION = "attention"  # linear weights of a layer's attention block
    MLP = "mlp"  # linear weights of a layer's feed-forward block (experts and routers included)
    NORM = "norm"  # norm weights and biases
    BIAS = "bias"  # bias of a linear layer that is not a head
    OTHER = "other"  # anything else (a pooler, a projector outside the layers, a scalar)


EMBEDDING_ROLES = (Role.EMBEDDING, Role.POSITION_EMBEDDING)
HEAD_ROLES = (Role.LM_HEAD, Role.CLASSIFIER)


@dataclass(frozen=True)
class Architecture:
    """The names one family of models uses; module names are dotted module paths without ``.weight``."""

    model_types: tuple[str, ...]
    embeddings: tuple[str, ...] = ()
    position_embeddings: tuple[str, ...] = ()
    lm_heads: tuple[str, ...] = ()
    classifiers: tuple[str, ...] = ()  # first component of the tensor name
    layers: tuple[str, ...] = ()  # the component just before the layer index
    attention: tuple[str, ...] = ()  # first component after the layer index
    mlp: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()  # last component of the module path
    # tables whose module is not looked up by its own input (OPT's learned positions are fed the attention mask and
    # add an offset): PEFT's LoRA on an embedding would index its factors with that input
    unindexed_tables: tuple[str, ...] = ()
    tied: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # output weight -> input weights it may alias

    def __post_init__(self) -> None:
        object.__setattr__(self, "tied", MappingProxyType(dict(self.tied)))  # tables are constants: read-only


_LLAMA_TIED = {"lm_head.weight": ("model.embed_tokens.weight", "embed_tokens.weight")}

TABLES: tuple[Architecture, ...] = (
    Architecture(
        model_types=("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "phi3"),
        embeddings=("embed_tokens",), lm_heads=("lm_head",), classifiers=("score",), layers=("layers",),
        attention=("self_attn",), mlp=("mlp", "block_sparse_moe"),
        norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
               "norm", "q_norm", "k_norm"),
        tied=_LLAMA_TIED,
    ),
    Architecture(
        model_types=("gpt2",),
        embeddings=("wte",), position_embeddings=("wpe",), lm_heads=("lm_head",), classifiers=("score", "classifier"),
        layers=("h",), attention=("attn",), mlp=("mlp",), norms=("ln_1", "ln_2", "ln_f"),
        tied={"lm_head.weight": ("transformer.wte.weight", "wte.weight")},
    ),
    Architecture(
        model_types=("gpt_neox",),
        embeddings=("embed_in",), lm_heads=("embed_out",), classifiers=("score", "classifier"), layers=("layers",),
        attention=("attention",), mlp=("mlp",), norms=("input_layernorm", "post_attention_layernorm", "final_layer_norm"),
        tied={"embed_out.weight": ("gpt_neox.embed_in.weight", "embed_in.weight")},
    ),
    Architecture(
        model_types=("opt",),
        embeddings=("embed_tokens",), position_embeddings=("embed_positions",), lm_heads=("lm_head",), classifiers=("score",),
        layers=("layers",), attention=("self_attn",), mlp=("fc1", "fc2"),
        norms=("self_attn_layer_norm", "final_layer_norm"), unindexed_tables=("embed_positions",),
        tied={"lm_head.weight": ("model.decoder.embed_tokens.weight", "decoder.embed_tokens.weight")},
    ),
    Architecture(
        model_types=("bert",),
        embeddings=("word_embeddings",), position_embeddings=("position_embeddings", "token_type_embeddings"),
        lm_heads=("cls.predictions.decoder",), classifiers=("classifier",), layers=("layer",),
        attention=("attention",), mlp=("intermediate", "output"), norms=("LayerNorm",),
        tied={"cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight")},
    ),
    Architecture(
        model_types=("roberta", "xlm-roberta"),
        embeddings=("word_embeddings",), position_embeddings=("position_embeddings", "token_type_embeddings"),
        lm_heads=("lm_head.decoder",), classifiers=("classifier",), layers=("layer",),
        attention=("attention",), mlp=("intermediate", "output"), norms=("LayerNorm", "layer_norm"),
        tied={"lm_head.decoder.weight": ("roberta.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight")},
    ),
    Architecture(
        model_types=("distilbert",),
        embeddings=("word_embeddings",), position_embeddings=("position_embeddings",), lm_heads=("vocab_projector",),
        classifiers=("pre_classifier", "classifier"), layers=("layer",), attention=("attention",), mlp=("ffn",),
        norms=("LayerNorm", "sa_layer_norm", "output_layer_norm", "vocab_layer_norm"),
        tied={"vocab_projector.weight": ("distilbert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight")},
    ),
)

# Unknown model types and names a table does not cover: the union of the names above, and the
# output/input pairs this project has always accepted for ``lm_head.weight``.
FALLBACK = Architecture(
    model_types=(),
    embeddings=("embed_tokens", "word_embeddings", "wte", "embed_in", "shared", "tok_embeddings"),
    position_embeddings=("wpe", "position_embeddings", "token_type_embeddings", "embed_positions"),
    lm_heads=("lm_head", "embed_out", "cls.predictions.decoder", "lm_head.decoder", "vocab_projector"),
    classifiers=("score", "classifier", "pre_classifier"), unindexed_tables=("embed_positions",),
    tied={"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                             "embed_tokens.weight")},
)

_BY_TYPE = {model_type: table for table in TABLES for model_type in table.model_types}
_DIGITS = re.compile(r"[0-9]+")
_GENERIC_NORM = re.compile(r"(?i).*norm.*|ln(_.*)?|.*_ln")
# a module named like a lookup table (patch_embed, token_embedding, position_embeddings), not ALBERT's
# embedding_hidden_mapping_in, which is a Linear
_GENERIC_EMBEDDING = re.compile(r".*embed(ding)?s?")


# model classes whose head is not the LM head a tied embedding stands for
_HEADLESS = re.compile(r"For(Sequence|Token|Audio|Image|AudioFrame)Classification$|ForQuestionAnswering$|ForMultipleChoice$")


def _setting(config: Any, key: str, default: Any = None) -> Any:
    """A config value from a dict or a transformers config object."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _ends_with(module: list[str], names: Iterable[str]) -> bool:
    return any(module[-len(parts):] == parts for parts in (n.split(".") for n in names) if len(parts) <= len(module))


def _generic_embedding(component: str) -> Optional[Role]:
    lowered = component.lower()
    if not _GENERIC_EMBEDDING.fullmatch(lowered):
        return None
    return Role.POSITION_EMBEDDING if ("position" in lowered or "token_type" in lowered) else Role.EMBEDDING


@dataclass(frozen=True)
class TensorRoles:
    """Roles of tensor names for one model (see the module docstring for the rules)."""

    table: Optional[Architecture]  # None: unknown model type, the fallback alone decides
    model_type: Optional[str] = None
    ties_embeddings: bool = True  # the config's tie_word_embeddings
    num_layers_setting: Optional[int] = None  # num_hidden_layers / n_layer from the config
    architectures: tuple[str, ...] = ()  # the config's model classes (``architectures``), () when unknown

    def _tables(self) -> tuple[Architecture, ...]:
        return (self.table, FALLBACK) if self.table is not None else (FALLBACK,)

    def layer_split(self, name: str) -> Optional[tuple[str, int, str]]:
        """``(block, index, rest)`` with ``name == block + "." + rest``, or None outside the layer stack.

        ``block`` is the layer's module path including its index (``model.layers.3``)."""
        parts = name.split(".")
        if self.table is not None and self.table.layers:
            for i in range(len(parts) - 2):
                if parts[i] in self.table.layers and _DIGITS.fullmatch(parts[i + 1]):
                    return ".".join(parts[: i + 2]), int(parts[i + 1]), ".".join(parts[i + 2 :])
        # fallback: the first all-digit component between two others
        for i in range(1, len(parts) - 1):
            if _DIGITS.fullmatch(parts[i]):
                return ".".join(parts[: i + 1]), int(parts[i]), ".".join(parts[i + 1 :])
        return None

    def layer_index(self, name: str) -> Optional[int]:
        """Index of the layer holding ``name`` (0-based), None for tensors outside the layer stack."""
        split = self.layer_split(name)
        return split[1] if split else None

    def num_layers(self, names: Iterable[str]) -> Optional[int]:
        """The config's layer count, else one more than the highest layer index among ``names``."""
        if self.num_layers_setting:
            return self.num_layers_setting
        indices = [i for i in map(self.layer_index, names) if i is not None]
        return max(indices) + 1 if indices else None

    def module_role(self, name: str) -> Role:
        """The role of the module ``name`` belongs to: a bias answers as its weight does."""
        parts = name.split(".")
        return self.role(".".join(parts[:-1] + ["weight"])) if len(parts) > 1 else self.role(name)

    def role(self, name: str) -> Role:
        """The role of the tensor ``name`` (a checkpoint or ``named_parameters`` name)."""
        parts = name.split(".")
        module, leaf = parts[:-1], parts[-1]
        if not module:
            return Role.OTHER
        role = self._module_kind(name, module)
        if leaf == "bias" and role in (Role.ATTENTION, Role.MLP, Role.OTHER):
            return Role.BIAS
        return role

    def _module_kind(self, name: str, module: list[str]) -> Role:
        tables = self._tables()
        if any(_ends_with(module, t.lm_heads) for t in tables):
            return Role.LM_HEAD
        if any(module[0] in t.classifiers for t in tables):
            return Role.CLASSIFIER
        if any(_ends_with(module, t.embeddings) for t in tables):
            return Role.EMBEDDING
        if any(_ends_with(module, t.position_embeddings) for t in tables):
            return Role.POSITION_EMBEDDING
        last = module[-1]
        if any(last in t.norms for t in tables) or _GENERIC_NORM.fullmatch(last):
            return Role.NORM
        embedding = _generic_embedding(last)
        if embedding is not None:
            return embedding
        split = self.layer_split(name)
        if split is None:
            return Role.OTHER
        inner = split[2].split(".")[:-1]
        if self.table is not None and inner:
            if inner[0] in self.table.attention:
                return Role.ATTENTION
            if inner[0] in self.table.mlp:
                return Role.MLP
        if any("attn" in part or "attention" in part for part in inner):
            return Role.ATTENTION
        return Role.MLP

    def is_embedding(self, name: str) -> bool:
        """A lookup table: token, position or token-type embedding (not a linear map of the input)."""
        return self.role(name) in EMBEDDING_ROLES

    def is_indexed_table(self, name: str, shape: tuple[int, ...]) -> bool:
        """An embedding table that is an ``nn.Embedding`` looked up by its module's input ids, so that PEFT's LoRA on
        embeddings (``lora_embedding_A/B``) can carry its change: a 2-D weight of a token, position or token-type table
        the tables name. Not a table known by its name's look alone (``patch_embed`` may be a linear map), nor one
        whose module is fed something else (``unindexed_tables``: OPT's ``embed_positions``)."""
        if len(shape) != 2 or not name.endswith(".weight") or self.role(name) not in EMBEDDING_ROLES:
            return False
        module = name.split(".")[:-1]
        tables = self._tables()
        if any(_ends_with(module, t.unindexed_tables) for t in tables):
            return False
        return any(_ends_with(module, t.embeddings + t.position_embeddings) for t in tables)

    def is_head(self, name: str) -> bool:
        """Part of an output head: the LM head or a classification head."""
        return self.role(name) in HEAD_ROLES

    def is_vocabulary(self, name: str) -> bool:
        """A tensor with one row per vocabulary entry by its name: the token embedding or the LM head."""
        return self.role(name) in (Role.EMBEDDING, Role.LM_HEAD)

    def is_linear_weight(self, name: str, shape: tuple[int, ...]) -> bool:
        """The 2-D weight of a linear map (attention, MLP, heads, others; GPT-2 Conv1D included)."""
        return len(shape) == 2 and name.endswith(".weight") and self.role(name) not in (*EMBEDDING_ROLES, Role.NORM)

    def _tied_pairs(self) -> dict[str, tuple[str, ...]]:
        # the table's pairs first, then the fallback's, so that no pair accepted before the tables is lost
        pairs: dict[str, tuple[str, ...]] = {}
        for table in self._tables():
            for output, inputs in table.tied.items():
                pairs[output] = tuple(dict.fromkeys(pairs.get(output, ()) + inputs))
        return pairs

    def tied_outputs(self) -> tuple[str, ...]:
        """Output weights that may be stored as (tied to) an input embedding."""
        return tuple(self._tied_pairs())

    def is_tied_output(self, name: str) -> bool:
        """An LM head weight the config ties to the input embedding: not stored separately, it moves with it."""
        return self.ties_embeddings and name.endswith(".weight") and self.role(name) == Role.LM_HEAD

    def tied_alias(self, name: str, present: Container[str]) -> Optional[str]:
        """The input embedding in ``present`` that stands for the output weight ``name`` when tied, else None."""
        if not self.ties_embeddings:
            return None
        return next((alias for alias in self._tied_pairs().get(name, ()) if alias in present), None)

    def has_output_head(self) -> bool:
        """Whether the model's class has an output head: False only when every class the config names is a
        bare encoder/decoder (``BertModel``) or a task head that replaces the LM head (``...ForSequenceClassification``).
        An unknown class counts as having one."""
        return not self.architectures or not all(
            name.endswith("Model") or _HEADLESS.search(name) for name in self.architectures)

    def unstored_tied_heads(self, present: Container[str]) -> dict[str, str]:
        """Output head -> the input embedding in ``present`` it is tied to, for heads the model has and the
        checkpoint does not store. A PEFT adapter that saves the embedding whole must save these heads too (PEFT
        replaces the embedding module only, which would leave a tied head at the base value); a model without
        the head gets none (a ``BertModel`` body has no ``cls.predictions.decoder``)."""
        if not self.has_output_head():
            return {}
        heads = {head: self.tied_alias(head, present) for head in self.tied_outputs() if head not in present}
        return {head: alias for head, alias in heads.items() if alias is not None}


def architecture_for(config: Any = None) -> TensorRoles:
    """Tensor roles for a model, from its config (a ``config.json`` dict, a ``model.config``, or None)."""
    model_type = _setting(config, "model_type")
    layers = _setting(config, "num_hidden_layers") or _setting(config, "n_layer")
    return TensorRoles(
        table=_BY_TYPE.get(model_type) if isinstance(model_type, str) else None,
        model_type=model_type if isinstance(model_type, str) else None,
        ties_embeddings=bool(_setting(config, "tie_word_embeddings", True)),
        num_layers_setting=layers if isinstance(layers, int) else None,
        architectures=tuple(a for a in _setting(config, "architectures", None) or () if isinstance(a, str)),
    )


# --------------------------------------------------------------------------- modules of multi-module models
#
# A vision-language model holds several layer stacks (a text decoder, a vision encoder, ...), each with its
# own layer count in a sub-config. A mergekit ``modules:`` recipe merges each stack on its own. For the
# models without a mergekit architecture file (LLaVA, PaliGemma, Idefics3/SmolVLM, Mllama, ...) mergekit
# 0.1.5 infers the modules from the tensor names (``mergekit/architecture/auto.py``): one module per layer
# stack, named by the part of a tensor name before its first ``.<digits>.`` (``model.text_model.layers``),
# plus ``default`` holding every tensor outside the stacks (embeddings, norms, the projector, the LM head),
# with no layers of its own. deltawise infers the same modules by the same rule (:func:`infer_stacks`),
# and finds the config key of each stack's layer count by its value (:func:`count_keys`), so that a
# recipe that changes a stack's depth updates the right count. :data:`MODULE_TABLES` adds, for LLaVA,
# the names its stacks have in the hub's (transformers 4) checkpoint layout.

DEFAULT_MODULE = "default"
_STACK_INDEX = re.compile(r"\.(\d+)\.")  # mergekit's RE_LAYER_INDEX: the first ".<digits>." of a name
# config keys that hold a layer count, at the top level or in a sub-config (text_config.num_hidden_layers)
COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth", "num_global_layers",
              "encoder_layers", "decoder_layers", "num_decoder_layers")
# per-layer kinds given as index lists next to a count key (Mllama's cross-attention layers, Qwen2.5-VL's
# full-attention blocks): an output layer is listed when the source layer it comes from was
LAYER_INDEX_LISTS = ("cross_attention_layers", "fullatt_block_indexes")
_SYNONYMS = {"language": "text", "visual": "vision"}  # words a stack's path and its sub-config spell differently
_GENERIC_WORDS = frozenset({"num", "hidden", "layers", "layer", "n", "config", "depth", "model"})


@dataclass(frozen=True)
class LayerStack:
    """One layer stack of a multi-module model: its paths and the config key of its layer count.

    ``paths`` holds the stack's container in each checkpoint layout (the tensors of its layer ``i`` are
    ``<path>.<i>.<rest>``); the first is the layout transformers 5 builds in memory, which is the name
    mergekit 0.1.5 infers for the module; a recipe may name the module by any of them. A stack inferred
    from tensor names has one path, ``layers`` (its count by the names: mergekit's depth for gradients),
    and ``count_key`` None with the reason in ``unresolved`` when no config key could be matched."""

    paths: tuple[str, ...]
    count_key: Optional[str]  # dotted key into config.json: "text_config.num_hidden_layers"
    layers: int = 0  # inferred stacks and a file stack without a count key: count by the tensor names (mergekit's
    #                  depth for gradients); 0: a table's stack, counted by its key
    unresolved: str = ""  # why count_key is None

    @property
    def name(self) -> str:
        return self.paths[0]

    def split(self, name: str) -> Optional[tuple[str, int, str]]:
        """``(path, index, rest)`` when ``name`` is a tensor of this stack's layer ``index``, else None."""
        for path in self.paths:
            if name.startswith(path + "."):
                index, _, rest = name[len(path) + 1:].partition(".")
                if rest and _DIGITS.fullmatch(index):
                    return path, int(index), rest
        return None


@dataclass(frozen=True)
class ModelModules:
    """The layer stacks of one family of multi-module models; everything else is ``default``'s."""

    architectures: tuple[str, ...]  # the config's ``architectures`` entry, for messages
    model_types: tuple[str, ...]  # the config's ``model_type``, which selects a table
    stacks: tuple[LayerStack, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return (DEFAULT_MODULE,) + tuple(s.name for s in self.stacks)

    def depth(self, name: str, config: Any) -> tuple[Optional[int], Optional[int]]:
        """(layer index, layer count) of ``name`` within its own stack; (None, None) outside the stacks."""
        for stack in self.stacks:
            found = stack.split(name)
            if found:
                count = stack.layers or config_value(config, stack.count_key or "")
                return found[1], count if isinstance(count, int) else None
        return None, None

    def stack(self, module: str) -> Optional[LayerStack]:
        """The stack a recipe's module name means (any of its paths); None for ``default`` or an unknown name."""
        return next((s for s in self.stacks if module in s.paths), None)


# LLaVA (1.5) and LLaVA-NeXT: a Llama-like text decoder and a CLIP vision encoder. Layouts: transformers 5
# in memory (model.language_model / model.vision_tower), transformers 4 checkpoints on the hub
# (language_model.model / vision_tower.vision_model), and transformers 5's save_pretrained.
_LLAVA_STACKS = (
    LayerStack(("model.language_model.layers", "language_model.model.layers"), "text_config.num_hidden_layers"),
    LayerStack(("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers",
                "vision_tower.vision_model.encoder.layers", "vision_tower.encoder.layers"),
               "vision_config.num_hidden_layers"),
)

MODULE_TABLES: tuple[ModelModules, ...] = (
    ModelModules(architectures=("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"),
                 model_types=("llava", "llava_next"), stacks=_LLAVA_STACKS),
)

_MODULES_BY_TYPE = {model_type: table for table in MODULE_TABLES for model_type in table.model_types}


def infer_stacks(names: Iterable[str]) -> dict[str, int]:
    """Layer stacks by tensor names, as mergekit 0.1.5 infers modules: path before the first ``.<digits>.``
    -> one more than the highest index under it (``model.visual.blocks.1.attn.qkv.weight``: ``model.visual.blocks``)."""
    stacks: dict[str, int] = {}
    for name in names:
        found = _STACK_INDEX.search(name)
        if found:
            path = name[: found.start()]
            stacks[path] = max(stacks.get(path, 0), int(found.group(1)) + 1)
    return dict(sorted(stacks.items()))


def _count_settings(config: Any) -> dict[str, int]:
    """Dotted key -> value of the layer-count keys (:data:`COUNT_KEYS`) of a config and its sub-configs."""
    if config is not None and not isinstance(config, Mapping) and hasattr(config, "to_dict"):
        config = config.to_dict()
    out: dict[str, int] = {}
    for key, value in (config or {}).items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in _count_settings(value).items() if "." not in k})
        elif key in COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
    return out


def _words(text: str) -> set[str]:
    words = {_SYNONYMS.get(w, w) for w in re.split(r"[._]", text.lower()) if w}
    return words - _GENERIC_WORDS


def count_keys(stacks: Mapping[str, int], config: Any) -> dict[str, tuple[Optional[str], str]]:
    """Per stack path, (the config key of its layer count, "") or (None, why not).

    A key fits a stack when it holds the stack's count (by its tensor names) and shares a word with the
    stack's path (its sub-config's or its own: ``text_config.num_hidden_layers`` fits
    ``model.text_model.layers``, and ``model.language_model.layers``, as "language" counts as "text";
    ``vision_config.num_global_layers`` fits ``model.vision_model.global_transformer.layers``). The key
    sharing most words wins; a tie, or a key that two stacks would take, is left unresolved."""
    settings = _count_settings(config)
    picked: dict[str, tuple[Optional[str], str]] = {}
    for path, count in stacks.items():
        held = [key for key, value in settings.items() if value == count]
        scored = sorted(((len(_words(key) & _words(path)), key) for key in held), reverse=True)
        if not held:
            picked[path] = (None, f"no config key ({', '.join(COUNT_KEYS)}, top level or in a sub-config) "
                                  f"holds its {count} layers")
        elif scored[0][0] == 0:
            picked[path] = (None, f"{', '.join(held)} hold {count} but none shares a word with its path")
        elif len(scored) > 1 and scored[1][0] == scored[0][0]:
            tied = [key for score, key in scored if score == scored[0][0]]
            picked[path] = (None, f"{' and '.join(sorted(tied))} both hold {count} and fit its path alike")
        else:
            picked[path] = (scored[0][1], "")
    found = dict(picked)  # a key two stacks would take is left to neither, whichever comes first
    for path, (key, _) in found.items():
        others = [p for p, (k, _) in found.items() if k == key and p != path] if key else []
        if others:
            picked[path] = (None, f"{key} fits {', '.join(others)} as well")
    return picked


def modules_for(config: Any, names: Optional[Iterable[str]] = None) -> Optional[ModelModules]:
    """The modules of a multi-module model from its config and tensor names; None for a model of one layer stack.

    LLaVA's come from :data:`MODULE_TABLES` (with the hub layout's names); any other model whose tensor
    names show two or more layer stacks (:func:`infer_stacks`, as mergekit) gets one module per stack,
    except the text families of :data:`TABLES`, which have one stack by definition."""
    model_type = _setting(config, "model_type")
    model_type = model_type if isinstance(model_type, str) else None
    table = _MODULES_BY_TYPE.get(model_type) if model_type else None
    if table is not None or names is None or model_type in _BY_TYPE:
        return table
    stacks = infer_stacks(names)
    if len(stacks) < 2:
        return None
    keys = count_keys(stacks, config)
    return ModelModules(architectures=(architecture_name(config),), model_types=(model_type,) if model_type else (),
                        stacks=tuple(LayerStack((path,), keys[path][0], count, keys[path][1])
                                     for path, count in stacks.items()))


def architecture_name(config: Any) -> str:
    """How a model calls its architecture, for messages: ``architectures[0]``, else its model_type."""
    names = _setting(config, "architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    model_type = _setting(config, "model_type")
    return f"model_type {model_type}" if isinstance(model_type, str) else "an architecture without a config"


def config_value(config: Any, key: str) -> Any:
    """The value of a dotted key (``text_config.num_hidden_layers``) in a config dict or object; None if absent."""
    value = config
    for part in key.split("."):
        value = _setting(value, part)
        if value is None:
            return None
    return value


# --------------------------------------------------------------------------- mergekit's architecture files
#
# mergekit 0.1.5 reads Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE), Gemma3 and Mistral3 through its own
# architecture files (mergekit/_data/architectures/{qwen2_vl,qwen2_5_vl,qwen3_vl_dense,qwen3_vl,gemma3vl,
# mistral3}.json), whose modules are
# ``text_decoder``, ``vision_tower`` and ``multi_modal_projector``. Each module owns its weights under a
# prefix: the ones before its layers (``pre_weights``, merged from its first slice), its layers, and the ones
# after (``post_weights``: the final norm and the LM head, merged from its last slice), all outside the layers
# at t = 0. Qwen's projector declares ``override_num_layers: 2`` with layer templates that carry no index
# (``visual.merger.mlp.0.weight``): mergekit plans them once per layer and the last one written stands, so
# they come from the last slice at t = 1. The files name transformers 4 (hub) keys, on which mergekit runs;
# :data:`FILE_TABLES` also lists the same modules under transformers 5's names, on which it stops, so that a
# recipe written for mergekit runs unchanged on checkpoints of either layout. Qwen3-VL's files name the one
# layout its checkpoints have (the hub's is transformers 5's); its projector's layers are the indexed deepstack
# mergers (``override_num_layers: 3``), a stack of its own whose count no config key holds.


@dataclass(frozen=True)
class FileModule:
    """One module of a mergekit architecture file: the tensors under its prefixes (the longest prefix of all
    modules wins), its layer stack if any, and which of its tensors mergekit plans after the layers."""

    name: str
    prefixes: tuple[str, ...]  # in each layout
    stack: Optional[LayerStack] = None
    post: str = ""  # fullmatch: post_weights (from the last slice)
    repeated: str = ""  # fullmatch: index-free layer templates (from the last slice, at t = 1)
    layers: int = 0  # override_num_layers of a module without a stack: its layer_range is [0, layers]


@dataclass(frozen=True)
class FileModules:
    """The modules of one mergekit architecture file."""

    file: str  # for messages: mergekit/_data/architectures/<file>
    model_types: tuple[str, ...]
    modules: tuple[FileModule, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    def module(self, name: str) -> Optional[FileModule]:
        return next((m for m in self.modules if m.name == name), None)

    def module_of(self, tensor: str) -> Optional[FileModule]:
        """The module owning tensor ``tensor`` (longest matching prefix), None when no module owns it."""
        best = max(((len(p), m) for m in self.modules for p in m.prefixes if tensor.startswith(p)),
                   key=lambda found: found[0], default=None)
        return best[1] if best else None

    def fits(self, names: Iterable[str]) -> bool:
        """Whether tensor names are in a layout the table knows: each module's stack holds some of them."""
        names = list(names)
        return all(any(m.stack.split(n) for n in names) for m in self.modules if m.stack)

    def depth(self, name: str, config: Any) -> tuple[Optional[int], Optional[int]]:
        """(layer index, layer count) of ``name`` for gradients, as mergekit plans it; (None, None): t = 0."""
        module = self.module_of(name)
        if module is None:
            return None, None
        found = module.stack.split(name) if module.stack else None
        if found:
            count = module.stack.layers or config_value(config, file_count_key(module.stack, config))
            return found[1], count if isinstance(count, int) else None
        if module.repeated and re.fullmatch(module.repeated, name):
            return module.layers - 1, module.layers
        return None, None


def _text_decoder(layers: tuple[str, ...], prefixes: tuple[str, ...], post: str) -> FileModule:
    return FileModule("text_decoder", prefixes, LayerStack(layers, "text_config.num_hidden_layers"), post)


_QWEN_VL = (
    _text_decoder(("model.language_model.layers", "model.layers"), ("model.language_model.", "model.", "lm_head."),
                  r"model\.(language_model\.)?norm\.weight|lm_head\.weight"),
    FileModule("vision_tower", ("model.visual.", "visual."),
               LayerStack(("model.visual.blocks", "visual.blocks"), "vision_config.depth")),
    FileModule("multi_modal_projector", ("model.visual.merger.", "visual.merger."),
               repeated=r"(model\.)?visual\.merger\.mlp\.\d+\.(weight|bias)", layers=2),
)
_TEXT_OF_CONDITIONAL = _text_decoder(
    ("model.language_model.layers", "language_model.model.layers"), ("model.language_model.", "language_model.", "lm_head."),
    r"(model\.language_model|language_model\.model)\.norm\.weight|(language_model\.)?lm_head\.weight")
_PROJECTOR = FileModule("multi_modal_projector", ("model.multi_modal_projector.", "multi_modal_projector."))

# Qwen3-VL (dense and MoE): one layout, the hub's and transformers 5's alike. The projector's layers are the
# deepstack mergers (``override_num_layers: 3``, no config key: their count is the length of
# vision_config.deepstack_visual_indexes, a list), so a recipe may merge them but not change their number.
_QWEN3_VL = (
    _text_decoder(("model.language_model.layers",), ("model.language_model.", "lm_head."),
                  r"model\.language_model\.norm\.weight|lm_head\.weight"),
    FileModule("vision_tower", ("model.visual.",), LayerStack(("model.visual.blocks",), "vision_config.depth")),
    FileModule("multi_modal_projector", ("model.visual.merger.", "model.visual.deepstack_merger_list."),
               LayerStack(("model.visual.deepstack_merger_list",), None, 3,
                          "mergekit's qwen3_vl files fix the deepstack mergers at 3 (override_num_layers); the model "
                          "counts them by the list vision_config.deepstack_visual_indexes")),
)

FILE_TABLES: tuple[FileModules, ...] = (
    FileModules("qwen2_vl.json", ("qwen2_vl",), _QWEN_VL),
    FileModules("qwen2_5_vl.json", ("qwen2_5_vl",), _QWEN_VL),
    FileModules("qwen3_vl_dense.json", ("qwen3_vl",), _QWEN3_VL),
    FileModules("qwen3_vl.json", ("qwen3_vl_moe",), _QWEN3_VL),
    FileModules("gemma3vl.json", ("gemma3",), (
        _TEXT_OF_CONDITIONAL,
        FileModule("vision_tower", ("model.vision_tower.", "vision_tower."),
                   LayerStack(("model.vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers",
                               "model.vision_tower.vision_model.encoder.layers"), "vision_config.num_hidden_layers"),
                   post=r".*\.post_layernorm\.(weight|bias)"),
        _PROJECTOR)),
    FileModules("mistral3.json", ("mistral3",), (
        _TEXT_OF_CONDITIONAL,
        FileModule("vision_tower", ("model.vision_tower.", "vision_tower."),
                   LayerStack(("model.vision_tower.transformer.layers", "vision_tower.transformer.layers"),
                              "vision_config.num_hidden_layers")),
        _PROJECTOR)),
)
_FILES_BY_TYPE = {model_type: table for table in FILE_TABLES for model_type in table.model_types}


def file_count_key(stack: LayerStack, config: Any) -> str:
    """The config key of a file stack's layer count: its own, else (a text stack of a hub config written before
    the text settings moved into ``text_config``, as Qwen2-VL's) the same key at the top level, mergekit's."""
    key = stack.count_key or ""
    if config_value(config, key) is None and key.startswith("text_config.") and \
            config_value(config, key.partition(".")[2]) is not None:
        return key.partition(".")[2]
    return key


def file_modules_for(config: Any, names: Optional[Iterable[str]] = None) -> Optional[FileModules]:
    """The modules of mergekit's architecture file for this model's ``model_type``; None when it has none here,
    or when ``names`` (the tensor names, if given) are in neither layout the table knows."""
    model_type = _setting(config, "model_type")
    table = _FILES_BY_TYPE.get(model_type) if isinstance(model_type, str) else None
    return table if table is not None and (names is None or table.fits(names)) else None
