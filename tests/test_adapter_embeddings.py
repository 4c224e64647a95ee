"""Changed embedding tables written as PEFT LoRA-embedding factors (``--adapter-embeddings lora``, the recipe's
``adapter: {embeddings: lora}``, ``extract --lora --adapter-embeddings lora``) instead of whole.

Checked on a tiny BERT body and a tiny Llama with tied embeddings: exact when the rank reaches the table delta's
rank; otherwise the reported error is the SVD tail computed by hand (per table and in the total); the adapter
loaded by PEFT (forward, and merge_and_unload) equals ``deltawise apply`` of it and the dense merge within that
error; LoRA inputs on embeddings concatenate exactly; biases beside LoRA embeddings are written as the modules'
new values (PEFT has no lora_bias for embeddings); a tied head is saved whole (PEFT's LoRA on the embedding would
leave it at the base value in the forward); the file is smaller than with whole tables; bad option values are
refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from delta_util import edit_model, low_rank
from test_delta_tied import EMBED, causal_lm, tied_pair, tokens  # noqa: F401  (tied_pair: a fixture)
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import load_state, perturb
from deltawise.architecture import architecture_for
from deltawise.cli import app
from deltawise.delta.apply import apply_delta
from deltawise.delta.lora_extract import extract_lora
from deltawise.errors import DeltawiseError, InputError
from deltawise.merge import merge

peft = pytest.importorskip("peft")
WORD, POS, TYPE = (f"embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"))
QUERY = "encoder.layer.0.attention.self.query"
TABLES = (WORD, POS, TYPE)


def bert_model(folder: Path):
    from transformers import BertModel

    return BertModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict:
    """A tiny BertModel body; ``low``: its word and position tables, a query weight and a LayerNorm changed at
    known ranks (3, 2, 3); ``full``: every tensor moved, as a full fine-tune moves them."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert_tables")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                        max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "base")
    low = edit_model(root / "base", root / "low", {
        WORD: lambda w: w + low_rank((100, 32), 3, seed=1, scale=2.0),
        POS: lambda w: w + low_rank((32, 32), 2, seed=2, scale=1.0),
        f"{QUERY}.weight": lambda w: w + low_rank((32, 32), 3, seed=3, scale=1.0),
        "embeddings.LayerNorm.weight": lambda w: w + 0.1,
    })
    full = perturb(root / "base", root / "full", seed=4, scale=0.05)
    return {"root": root, "base": root / "base", "low": low, "full": full, "base_state": load_state(root / "base")}


def ta_recipe(bert: dict, models: list[Path], adapter: dict, lam: float = 1.0) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(bert["base"]), "models": [{"model": str(m)} for m in models],
            "parameters": {"lambda": lam}, "adapter": adapter}


def peft_merged(model, folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft.PeftModel.from_pretrained(model, folder).merge_and_unload()
            .state_dict().items()}


def sidecar(folder: Path) -> dict:
    return json.loads((folder / "deltawise.json").read_text())


def weights_bytes(folder: Path) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size


def test_indexed_tables_are_the_embeddings_peft_can_wrap():
    bert_roles = architecture_for({"model_type": "bert", "architectures": ["BertModel"]})
    assert all(bert_roles.is_indexed_table(t, (100, 32)) for t in TABLES)
    assert not bert_roles.is_indexed_table(f"{QUERY}.weight", (32, 32))
    assert not bert_roles.is_indexed_table("embeddings.LayerNorm.weight", (32,))
    llama = architecture_for({"model_type": "llama"})
    assert llama.is_indexed_table("model.embed_tokens.weight", (128, 32))
    assert not llama.is_indexed_table("lm_head.weight", (128, 32))
    opt = architecture_for({"model_type": "opt"})
    assert opt.is_indexed_table("model.decoder.embed_tokens.weight", (50, 16))
    assert not opt.is_indexed_table("model.decoder.embed_positions.weight", (66, 16))  # fed the attention mask
    assert not architecture_for(None).is_indexed_table("vit.patch_embed.weight", (16, 48))  # known by its look only


def test_at_the_deltas_rank_the_lora_tables_are_exact_and_peft_gives_the_fine_tune(bert, tmp_path):
    result = merge(ta_recipe(bert, [bert["low"]], {"rank": 3, "embeddings": "lora"}), tmp_path / "ad")
    rows = {r.name: r for r in result.rows}
    assert rows[WORD].embedding and rows[WORD].how == "svd" and rows[WORD].rank == 3
    assert rows[POS].embedding and rows[POS].relative_error < 1e-6  # rank 2 < 3: nothing left out
    assert result.total_relative_error < 1e-5
    weights = set(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.embeddings.word_embeddings.lora_embedding_A" in weights
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "embeddings.word_embeddings" in config["target_modules"]
    assert config["modules_to_save"] == ["embeddings.LayerNorm"]
    merged, want = peft_merged(bert_model(bert["base"]), tmp_path / "ad"), load_state(bert["low"])
    for name, value in want.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=2e-6, msg=name)
    report = sidecar(tmp_path / "ad")
    assert report["adapter"]["embeddings"] == "lora" and report["lora_embedding_tables"] == 2


def test_below_the_rank_the_error_is_the_svd_tail_and_peft_equals_apply(bert, tmp_path):
    rank = 4
    models = [bert["low"], bert["full"]]
    result = merge(ta_recipe(bert, models, {"rank": rank, "embeddings": "lora"}, lam=0.7), tmp_path / "ad")
    merge({k: v for k, v in ta_recipe(bert, models, {}, lam=0.7).items() if k != "adapter"}, tmp_path / "dense")
    base, dense = bert["base_state"], load_state(tmp_path / "dense")
    want = {k: dense[k].double() - base[k].double() for k in base}
    rows = {r.name: r for r in result.rows}
    for table in TABLES:  # the tail of the singular values of each table's merged delta
        s = torch.linalg.svdvals(want[table])
        assert rows[table].embedding and rows[table].rank == min(rank, len(s))
        assert rows[table].relative_error == pytest.approx(float(s[rank:].norm() / s.norm()), abs=1e-5)
    svd = [k for k in want if k.endswith(".weight") and want[k].dim() == 2]  # every matrix here: tables and linear
    assert {r.name for r in result.rows if r.how == "svd"} == set(svd)
    lost = sum(float((torch.linalg.svdvals(want[k])[rank:] ** 2).sum()) for k in svd)
    total = sum(float(v.norm()) ** 2 for v in want.values())
    assert result.total_relative_error == pytest.approx((lost / total) ** 0.5, rel=1e-4)
    assert result.total_relative_error > 0.1  # a full fine-tune is far from rank 4: the test tells the errors apart
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only" and config["lora_bias"] is False  # PEFT refuses lora_bias for embeddings
    merged = peft_merged(bert_model(bert["base"]), tmp_path / "ad")
    apply_delta(str(tmp_path / "ad"), str(bert["base"]), tmp_path / "applied")
    applied = load_state(tmp_path / "applied")
    for name in base:
        torch.testing.assert_close(merged[name], applied[name], rtol=1e-5, atol=1e-6, msg=name)
        got = merged[name].double() - base[name].double()
        error = float((got - want[name]).norm() / want[name].norm())
        assert error == pytest.approx(rows[name].relative_error, abs=2e-5), name  # the reported error is the real one
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # PEFT's forward with the adapter unmerged: the applied body's
        unmerged = peft.PeftModel.from_pretrained(bert_model(bert["base"]), tmp_path / "ad").eval()(x).last_hidden_state
        torch.testing.assert_close(unmerged, bert_model(tmp_path / "applied")(x).last_hidden_state, rtol=1e-4, atol=1e-5)
    merge(ta_recipe(bert, models, {"rank": rank}, lam=0.7), tmp_path / "whole")
    assert weights_bytes(tmp_path / "ad") < 0.75 * weights_bytes(tmp_path / "whole")


def test_lora_inputs_on_embeddings_concatenate_exactly(bert, tmp_path):
    deltas = {}
    base = bert["base_state"]
    for seed in (1, 2):
        model = peft.get_peft_model(bert_model(bert["base"]), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["word_embeddings", "query"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / f"in{seed}")
        merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
        deltas[seed] = {k: merged[k] - base[k] for k in base}
    recipe = {"merge_method": "task_arithmetic", "base_model": str(bert["base"]), "parameters": {"lambda": 1.0},
              "models": [{"model": str(tmp_path / "in1"), "parameters": {"weight": 0.5}},
                         {"model": str(tmp_path / "in2"), "parameters": {"weight": -1.5}}]}
    result = merge({**recipe, "adapter": {"embeddings": "lora"}}, tmp_path / "ad")
    rows = {r.name: r for r in result.rows}
    assert result.exact and rows[WORD].how == "concat" and rows[WORD].rank == 4 and rows[WORD].embedding
    got = peft_merged(bert_model(bert["base"]), tmp_path / "ad")
    for name in base:
        torch.testing.assert_close(got[name] - base[name], 0.5 * deltas[1][name] - 1.5 * deltas[2][name],
                                   rtol=1e-5, atol=1e-6, msg=name)
    whole = merge({**recipe, "adapter": {}}, tmp_path / "whole")  # the default: the table saved whole, exact too
    assert {r.name: r.how for r in whole.rows}[WORD] == "full"


def test_extract_lora_tables(bert, tmp_path):
    result = extract_lora(str(bert["low"]), str(bert["base"]), tmp_path / "ad", rank=3, embeddings="lora")
    rows = {r.name: r for r in result.rows}
    assert rows[WORD].kind == "lowrank" and rows[WORD].extra == {"rank": 3, "embedding": True}
    assert result.summary["lora_embedding_tables"] == 2
    merged = peft_merged(bert_model(bert["base"]), tmp_path / "ad")
    for name, value in load_state(bert["low"]).items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=2e-6, msg=name)
    extract_lora(str(bert["low"]), str(bert["base"]), tmp_path / "whole", rank=3)
    assert weights_bytes(tmp_path / "ad") < weights_bytes(tmp_path / "whole")
    low = extract_lora(str(bert["low"]), str(bert["base"]), tmp_path / "r1", rank=1, embeddings="lora")
    s = torch.linalg.svdvals(load_state(bert["low"])[WORD].double() - bert["base_state"][WORD].double())
    assert {r.name: r for r in low.rows}[WORD].error == pytest.approx(float(s[1:].norm() / s.norm()), abs=1e-5)


@pytest.mark.parametrize("how", ["merge", "extract"])
def test_a_tied_head_is_saved_whole_beside_a_lora_embedding(tied_pair, tmp_path, how):  # noqa: F811
    base, ft = tied_pair
    if how == "merge":
        result = merge({"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(ft)}],
                        "parameters": {"lambda": 1.0}, "adapter": {"rank": 8, "embeddings": "lora"}}, tmp_path / "ad")
        rows = {r.name: r for r in result.rows}
        assert rows[EMBED].embedding and rows[EMBED].how == "svd" and rows[EMBED].relative_error > 0.01
    else:
        result = extract_lora(str(ft), str(base), tmp_path / "ad", rank=8, embeddings="lora")
    assert any("lm_head" in w and "saved whole" in w for w in result.warnings)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and "model.embed_tokens" in config["target_modules"]
    apply_delta(str(tmp_path / "ad"), str(base), tmp_path / "applied")
    assert "lm_head.weight" not in load_state(tmp_path / "applied")  # still a tied checkpoint
    with torch.no_grad():
        ours = causal_lm(tmp_path / "applied")(tokens()).logits
        model = peft.PeftModel.from_pretrained(causal_lm(base), tmp_path / "ad").eval()
        torch.testing.assert_close(model(tokens()).logits, ours, rtol=1e-4, atol=1e-5)  # PEFT's forward
        torch.testing.assert_close(model.merge_and_unload()(tokens()).logits, ours, rtol=1e-4, atol=1e-5)  # its merge
    # why the head is saved: without it PEFT's forward keeps the tied head at the base value
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    state = load_file(weights)
    del state["base_model.model.lm_head.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    config["modules_to_save"] = None
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    with torch.no_grad():
        headless = peft.PeftModel.from_pretrained(causal_lm(base), tmp_path / "ad").eval()(tokens()).logits
    assert not torch.allclose(headless, ours, atol=1e-3)


def test_bad_values_and_misplaced_options_are_refused(bert, tmp_path):
    runner = CliRunner()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(ta_recipe(bert, [bert["low"]], {"rank": 3})))
    bad = runner.invoke(app, ["merge", str(path), str(tmp_path / "o1"), "--adapter-embeddings", "dense", "-q"])
    assert isinstance(bad.exception, InputError) and "whole, lora" in str(bad.exception)
    model = runner.invoke(app, ["merge", str(path), str(tmp_path / "o2"), "--output-format", "model",
                                "--adapter-embeddings", "lora", "-q"])
    assert isinstance(model.exception, DeltawiseError) and "adapter output" in str(model.exception)
    path.write_text(yaml.safe_dump(ta_recipe(bert, [bert["low"]], {"rank": 3, "embeddings": "lora"})))
    disagree = runner.invoke(app, ["merge", str(path), str(tmp_path / "o3"), "--adapter-embeddings", "whole", "-q"])
    assert isinstance(disagree.exception, DeltawiseError) and "disagrees" in str(disagree.exception)
    with pytest.raises(DeltawiseError, match="embeddings"):
        merge(ta_recipe(bert, [bert["low"]], {"rank": 3, "embeddings": "dense"}), tmp_path / "o4")
    with pytest.raises(InputError, match="whole, lora"):
        extract_lora(str(bert["low"]), str(bert["base"]), tmp_path / "o5", rank=3, embeddings="low")
    no_lora = runner.invoke(app, ["extract", str(bert["low"]), "--base", str(bert["base"]), "-o", str(tmp_path / "o6"),
                                  "--adapter-embeddings", "lora", "-q"])
    assert isinstance(no_lora.exception, DeltawiseError) and "need --lora" in str(no_lora.exception)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
    ok = runner.invoke(app, ["merge", str(path), str(tmp_path / "o7"), "-q"])
    assert ok.exit_code == 0, ok.output
    assert "embedding tables" in ok.output and sidecar(tmp_path / "o7")["lora_embedding_tables"] == 2
    flag = runner.invoke(app, ["extract", str(bert["low"]), "--base", str(bert["base"]), "-o", str(tmp_path / "o8"),
                               "--lora", "--rank", "3", "--adapter-embeddings", "lora", "-q"])
    assert flag.exit_code == 0, flag.output
    assert sidecar(tmp_path / "o8")["parameters"]["embeddings"] == "lora"
