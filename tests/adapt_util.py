"""Helpers for the adaptation tests: a tiny Llama with a tokenizer, a data file, one training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DOCS = [
    "Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.",
    "Complex is better than complicated.", "Flat is better than nested.", "Sparse is better than dense.",
    "Readability counts, and errors should never pass silently.", "Now is better than never, although never is often better.",
]


def write_numbered_docs(path: Path) -> Path:
    """DOCS as a '%'-separated text file, each doc numbered ("... Item 3."), so that BaM's seeded split into
    branches is visible in the texts; returns ``path``."""
    path.write_text("\n%\n".join(f"{d} Item {i}." for i, d in enumerate(DOCS)) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> dict[str, Path]:
    """Read-only: ``model`` (Llama hidden 32, 2 layers, tokenizer), ``data`` (8 '%'-separated docs),
    ``jsonl`` (prompt/response), ``cls`` (text/label JSONL)."""
    from tiny_models import save_tiny_llama

    root = tmp_path_factory.mktemp("tiny_lm")
    model = save_tiny_llama(root / "model", DOCS * 4, hidden=32, layers=2, vocab=96)
    data = root / "data.txt"
    data.write_text("\n%\n".join(DOCS) + "\n")
    jsonl = root / "pr.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": d.split(" is ")[0] + " is", "response": " " + d.split(" is ", 1)[-1]}) + "\n"
                             for d in DOCS))
    cls = root / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": d, "label": "neg" if "ugly" in d or "never" in d else "pos"}) + "\n"
                           for d in DOCS))
    return {"model": model, "data": data, "jsonl": jsonl, "cls": cls, "root": root}


def batch_of(tiny_lm: dict[str, Path], task: str = "causal_lm", data: Path | None = None) -> dict[str, torch.Tensor]:
    """The whole data file as one padded batch, tokenized exactly as the trainer does."""
    from deltawise.adapt.data import Collator, label_mapping, read_examples, tokenize
    from deltawise.adapt.train import load_tokenizer

    tok = load_tokenizer(tiny_lm["model"])
    ex = read_examples(data or tiny_lm["data"], task)
    l2i = label_mapping(ex) if task == "classification" else None
    return Collator(tok.pad_token_id, task)(tokenize(ex, tok, 64, task, l2i))


def base_model(folder: Path, task: str = "causal_lm", num_labels: int | None = None):
    from deltawise.adapt.train import load_model, load_tokenizer

    return load_model(folder, task, num_labels, load_tokenizer(folder).pad_token_id).eval()


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def one_step(model, batch, params, lr: float, optimizer=None) -> None:
    """What the trainer does for one step with grad-accum 1: loss, backward, clip at 1.0, AdamW."""
    model.train()
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad()


def train_cfg(tiny_lm, out: Path, method: str, method_params: dict | None = None, **kw):
    from deltawise.adapt import TrainConfig

    base = dict(model=tiny_lm["model"], data=tiny_lm["data"], output=out, method=method, max_steps=1, batch_size=8,
                lr=1e-2, seed=0, progress=False, method_params=dict(method_params or {}))
    base.update(kw)
    return TrainConfig(**base)


def write_llama_gguf(folder: Path, out: Path) -> Path:
    """Write a float32 Llama GGUF from a HF folder the way llama.cpp's converter lays it out
    (tensor names, q/k head permutation, "llama" tokenizer metadata), with the ``gguf`` package."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    c = model.config

    def permute(w, n_head):  # llama.cpp's rotary layout; transformers undoes it on load
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    wr = gguf.GGUFWriter(str(out), "llama")
    wr.add_context_length(c.max_position_embeddings)
    wr.add_embedding_length(c.hidden_size)
    wr.add_block_count(c.num_hidden_layers)
    wr.add_feed_forward_length(c.intermediate_size)
    wr.add_head_count(c.num_attention_heads)
    wr.add_head_count_kv(c.num_key_value_heads)
    wr.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    wr.add_layer_norm_rms_eps(c.rms_norm_eps)
    wr.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    wr.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    wr.add_tokenizer_model("llama")
    wr.add_token_list([t for t, _ in vocab])
    wr.add_token_scores([0.0] * len(vocab))
    wr.add_token_types([3 if t.startswith("<") else 1 for t, _ in vocab])  # 3 = control token
    wr.add_bos_token_id(tok.bos_token_id)
    wr.add_eos_token_id(tok.eos_token_id)
    wr.add_unk_token_id(tok.unk_token_id)
    wr.add_pad_token_id(tok.pad_token_id)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                 "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in model.state_dict().items():
        a = value.float().numpy()
        if key in top:
            name = top[key]
        else:
            parts = key.split(".")
            module = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{per_layer[module]}.weight"
            if module == "self_attn.q_proj":
                a = permute(a, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = permute(a, c.num_key_value_heads)
        wr.add_tensor(name, np.ascontiguousarray(a))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return out
