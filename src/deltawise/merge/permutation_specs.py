"""Which function-preserving permutations a model has, found from its tensor names and config.

- Llama-like decoders (``layers.N.self_attn.{q,k,v,o}_proj``, ``layers.N.mlp.{gate,up,down}_proj``:
  Llama, Mistral, Qwen2, ...), per layer:
  * MLP units: rows of gate_proj/up_proj (and their biases), columns of down_proj.
  * attention: the key/value heads with their groups of query heads, as whole blocks: rows of
    k_proj/v_proj (block head_dim), rows of q_proj and columns of o_proj (block
    (heads / kv_heads) x head_dim), and q/k/v biases when present. Whole heads keep RoPE exact
    (it rotates within a head). Without GQA this is a permutation of all heads. Permuting
    query heads *within* a kv group is also function-preserving but not searched.
- BERT-like encoders (``layer.N.attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``), per layer: intermediate units (rows and bias of
  intermediate.dense, columns of output.dense) and attention heads (rows and biases of
  query/key/value, columns of attention.output.dense; block head_dim).
- Anything else: a plain MLP chain, ``X.weight`` 2-D tensors in natural order whose output
  size is the next one's input size (``X.bias`` follows its rows); the hidden units between
  consecutive layers are permuted, the input features and the outputs are not.
The residual stream (embeddings, norms, every block's input and output) is not permuted.
Layers and their index come from ``deltawise.architecture`` (the config's model type, else names).
"""

from __future__ import annotations

from typing import Optional

from deltawise.architecture import TensorRoles, architecture_for
from deltawise.merge.permutation import Axis, PermGroup

_LLAMA_FIRST = "self_attn.q_proj.weight"  # the first tensor of a Llama-like layer
_BERT_FIRST = "attention.self.query.weight"  # the first tensor of a BERT-like layer


def _layers(names: set[str], roles: TensorRoles, first: str) -> list[tuple[str, str]]:
    """(prefix ending in ".", layer index) of every layer that holds ``first``, in sorted name order."""
    splits = [roles.layer_split(n) for n in sorted(names)]
    return [(f"{block}.", str(index)) for block, index, rest in filter(None, splits) if rest == first]


def _with_bias(names: set[str], prefix: str, axis_rows: list[tuple[str, int]]) -> list[Axis]:
    """Row axes of ``prefix+X.weight`` plus ``prefix+X.bias`` when it exists."""
    out = []
    for module, block in axis_rows:
        out.append(Axis(f"{prefix}{module}.weight", 0, block))
        if f"{prefix}{module}.bias" in names:
            out.append(Axis(f"{prefix}{module}.bias", 0, block))
    return out


def llama_spec(shapes: dict[str, tuple[int, ...]], config: dict) -> list[PermGroup]:
    names = set(shapes)
    roles = architecture_for(config)
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    group = heads // kv
    spec = []
    for p, layer in _layers(names, roles, _LLAMA_FIRST):
        mlp = f"{p}mlp."
        if f"{mlp}down_proj.weight" in names:
            size = shapes[f"{mlp}down_proj.weight"][1]
            spec.append(PermGroup(f"layer{layer}.mlp", size, _with_bias(names, mlp, [("gate_proj", 1), ("up_proj", 1)])
                                  + [Axis(f"{mlp}down_proj.weight", 1)]))
        attn = f"{p}self_attn."
        axes = _with_bias(names, attn, [("q_proj", group * head_dim), ("k_proj", head_dim), ("v_proj", head_dim)])
        spec.append(PermGroup(f"layer{layer}.heads", kv, axes + [Axis(f"{attn}o_proj.weight", 1, group * head_dim)]))
    return spec


def bert_spec(shapes: dict[str, tuple[int, ...]], config: dict) -> list[PermGroup]:
    names = set(shapes)
    roles = architecture_for(config)
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    spec = []
    for p, layer in _layers(names, roles, _BERT_FIRST):
        size = shapes[f"{p}intermediate.dense.weight"][0]
        spec.append(PermGroup(f"layer{layer}.intermediate", size, _with_bias(names, p, [("intermediate.dense", 1)])
                              + [Axis(f"{p}output.dense.weight", 1)]))
        axes = _with_bias(names, f"{p}attention.self.", [("query", head_dim), ("key", head_dim), ("value", head_dim)])
        spec.append(PermGroup(f"layer{layer}.heads", heads, axes + [Axis(f"{p}attention.output.dense.weight", 1, head_dim)]))
    return spec


def mlp_chain_spec(shapes: dict[str, tuple[int, ...]], order: list[str]) -> list[PermGroup]:
    weights = [n for n in order if n.endswith(".weight") and len(shapes[n]) == 2]
    spec = []
    for i, (w, nxt) in enumerate(zip(weights, weights[1:])):
        size = shapes[w][0]
        if shapes[nxt][1] != size:
            return []  # not a chain: nothing we can permute safely
        axes = [Axis(w, 0)]
        bias = w[: -len("weight")] + "bias"
        if bias in shapes:
            axes.append(Axis(bias, 0))
        spec.append(PermGroup(f"hidden{i}", size, axes + [Axis(nxt, 1)]))
    return spec


def detect_spec(shapes: dict[str, tuple[int, ...]], order: list[str], config: Optional[dict]) -> tuple[str, list[PermGroup]]:
    """(architecture, spec): llama, bert or mlp (empty spec when nothing fits)."""
    config = config or {}
    roles = architecture_for(config)
    if _layers(set(shapes), roles, _LLAMA_FIRST) and "num_attention_heads" in config:
        return "llama", llama_spec(shapes, config)
    if _layers(set(shapes), roles, _BERT_FIRST) and "num_attention_heads" in config:
        return "bert", bert_spec(shapes, config)
    return "mlp", mlp_chain_spec(shapes, order)
