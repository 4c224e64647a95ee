"""Weight matching (Git Re-Basin): recovering a known permutation exactly (MLP chain, tiny Llama
with GQA heads and MLP units), permuted B computing the same function as B in transformers
(Llama, BERT), the objective never decreasing, and the interpolation formula."""

from __future__ import annotations

import pytest
import torch

from conftest import load_state, save_llama
from deltawise.errors import RecipeError
from deltawise.merge import merge
from deltawise.merge.permutation import weight_matching
from deltawise.merge.permutation_specs import mlp_chain_spec


def run(a, b, out, **params):
    return merge({"merge_method": "weight_matching", "models": [{"model": str(a)}, {"model": str(b)}], "parameters": params,
                  "seed": 3}, str(out))


def mlp(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dims = [32, 24, 20, 6]
    state = {}
    for i, (n_in, n_out) in enumerate(zip(dims, dims[1:])):
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=gen)
        state[f"layers.{i}.bias"] = torch.randn(n_out, generator=gen)
    return state


def permute_mlp(state: dict, perms: list[torch.Tensor]) -> dict:
    """Hidden units of layer i by perms[i]: rows of layer i, columns of layer i + 1."""
    out = dict(state)
    for i, p in enumerate(perms):
        out[f"layers.{i}.weight"] = out[f"layers.{i}.weight"][p]
        out[f"layers.{i}.bias"] = out[f"layers.{i}.bias"][p]
        out[f"layers.{i + 1}.weight"] = out[f"layers.{i + 1}.weight"][:, p]
    return out


def mlp_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    for i in range(3):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
        x = torch.relu(x) if i < 2 else x
    return x


def objective(a: dict, b: dict) -> float:
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a)


def test_mlp_recovers_a_known_permutation_exactly(make_folder, tmp_path, monkeypatch):
    from deltawise.merge import engine

    a = mlp(0)
    gen = torch.Generator().manual_seed(1)
    b = permute_mlp(a, [torch.randperm(24, generator=gen), torch.randperm(20, generator=gen)])
    x = torch.randn(5, 32, generator=gen)
    assert torch.allclose(mlp_forward(b, x), mlp_forward(a, x), atol=1e-5)  # the permutation is a symmetry
    assert not torch.equal(b["layers.0.weight"], a["layers.0.weight"])
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 64)  # permuted rows are gathered per row chunk
    run(make_folder("a", a), make_folder("b", b), tmp_path / "out", t=1.0)
    got = load_state(tmp_path / "out")
    assert all(torch.equal(got[k], a[k]) for k in a)


def test_objective_never_decreases_and_function_is_kept(make_folder, tmp_path):
    a, b = mlp(0), mlp(1)
    shapes = {k: tuple(v.shape) for k, v in a.items()}
    spec = mlp_chain_spec(shapes, list(a))
    assert [g.size for g in spec] == [24, 20]
    history = []

    def record(perms):
        p = [perms["hidden0"], perms["hidden1"]]
        history.append(objective(a, permute_mlp(b, p)))

    perms = weight_matching(spec, a.__getitem__, b.__getitem__, seed=3, callback=record)  # the recipes seed
    assert len(history) >= 4  # at least two sweeps: the last one confirms convergence
    assert all(y >= x - 1e-9 for x, y in zip(history, history[1:])), history
    assert history[-1] > objective(a, b)
    # through a recipe: permuted B computes B's function, t interpolates
    run(make_folder("a", a), make_folder("b", b), tmp_path / "pb", t=1.0)
    pb = load_state(tmp_path / "pb")
    assert all(torch.equal(pb[k], v) for k, v in permute_mlp(b, [perms["hidden0"], perms["hidden1"]]).items())
    x = torch.randn(7, 32)
    assert torch.allclose(mlp_forward(pb, x), mlp_forward(b, x), atol=1e-5)
    run(make_folder("a2", a), make_folder("b2", b), tmp_path / "mid", t=0.25)
    mid = load_state(tmp_path / "mid")
    assert all(torch.allclose(mid[k], 0.75 * a[k] + 0.25 * pb[k], atol=1e-6) for k in a)


def permute_llama(state: dict, cfg, gen) -> dict:
    """Random MLP-unit and kv-group permutations of every layer, written independently of the spec."""
    out = dict(state)
    kv, heads, hidden = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.hidden_size
    hd = hidden // heads
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        units = torch.randperm(cfg.intermediate_size, generator=gen)
        for name in ("gate_proj", "up_proj"):
            out[f"{p}mlp.{name}.weight"] = out[f"{p}mlp.{name}.weight"][units]
        out[f"{p}mlp.down_proj.weight"] = out[f"{p}mlp.down_proj.weight"][:, units]
        groups = torch.randperm(kv, generator=gen) if layer else torch.arange(kv).roll(1)  # layer 0 surely moves
        out[f"{p}self_attn.q_proj.weight"] = (out[f"{p}self_attn.q_proj.weight"].reshape(kv, -1, hidden)[groups]
                                              .reshape(-1, hidden))
        for name in ("k_proj", "v_proj"):
            out[f"{p}self_attn.{name}.weight"] = (out[f"{p}self_attn.{name}.weight"].reshape(kv, hd, hidden)[groups]
                                                  .reshape(-1, hidden))
        out[f"{p}self_attn.o_proj.weight"] = (out[f"{p}self_attn.o_proj.weight"].reshape(hidden, kv, -1)[:, groups]
                                              .reshape(hidden, -1))
    return out


def llama_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(torch.tensor([[1, 5, 9, 2, 7, 3]])).logits


def test_llama_recovers_mlp_and_gqa_head_permutations(llama_family, tmp_path):
    import shutil

    from safetensors.torch import save_file
    from conftest import tiny_llama_config

    cfg = tiny_llama_config()
    a = load_state(llama_family["base"])
    b = permute_llama(a, cfg, torch.Generator().manual_seed(7))
    shutil.copytree(llama_family["base"], tmp_path / "b")
    save_file(b, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    assert torch.allclose(llama_logits(tmp_path / "b"), llama_logits(llama_family["base"]), atol=1e-5)
    assert any(not torch.equal(b[k], a[k]) for k in a if "q_proj" in k)  # some kv group moved
    run(llama_family["base"], tmp_path / "b", tmp_path / "out", t=1.0)
    got = load_state(tmp_path / "out")
    assert all(torch.equal(got[k], a[k]) for k in a)


def test_llama_permuted_b_keeps_its_function(tmp_path):
    a = save_llama(tmp_path / "a", seed=0)
    b = save_llama(tmp_path / "b", seed=1)
    run(a, b, tmp_path / "pb", t=1.0)
    assert torch.allclose(llama_logits(tmp_path / "pb"), llama_logits(b), atol=1e-5)
    sa, sb, spb = load_state(a), load_state(b), load_state(tmp_path / "pb")
    assert objective(sa, spb) > objective(sa, sb)  # better aligned than unpermuted
    run(a, b, tmp_path / "mid", t=0.5)
    mid = load_state(tmp_path / "mid")
    assert all(torch.allclose(mid[k], 0.5 * sa[k] + 0.5 * spb[k], atol=1e-6) for k in sa)


def test_bert_permuted_b_keeps_its_function(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                     max_position_embeddings=64)
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        BertModel(cfg).save_pretrained(tmp_path / name)
    run(tmp_path / "a", tmp_path / "b", tmp_path / "pb", t=1.0)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        ref = BertModel.from_pretrained(tmp_path / "b").eval()(ids).last_hidden_state
        got = BertModel.from_pretrained(tmp_path / "pb").eval()(ids).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-5)
    sb, spb = load_state(tmp_path / "b"), load_state(tmp_path / "pb")
    changed = [k for k in sb if not torch.equal(sb[k], spb[k])]
    assert any("attention.self.query" in k for k in changed) and any("intermediate.dense" in k for k in changed)


def test_refusals(make_folder, tmp_path):
    a = make_folder("a", mlp(0))
    b = make_folder("b", mlp(1))
    with pytest.raises(RecipeError, match="no base_model"):
        merge({"merge_method": "weight_matching", "base_model": str(a), "models": [{"model": str(b)}]}, str(tmp_path / "o"))
    flat = make_folder("flat", {"x.weight": torch.ones(3, 4), "y.weight": torch.ones(5, 6)})
    flat2 = make_folder("flat2", {"x.weight": torch.ones(3, 4), "y.weight": torch.ones(5, 6)})
    with pytest.raises(RecipeError, match="nothing to permute"):
        run(flat, flat2, tmp_path / "o")
    with pytest.raises(RecipeError, match="cannot be excluded"):
        merge({"merge_method": "weight_matching", "models": [{"model": str(a)}, {"model": str(b)}],
               "exclude": ["layers\\.1\\.bias"]}, str(tmp_path / "o"))
