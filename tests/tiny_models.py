"""Tiny tokenizers and models for tests, demos and benchmarks that must run offline.

A real model brings its own tokenizer; random tiny models do not, so this trains a small BPE
tokenizer on the given texts (seconds) and saves it next to the model in the HF format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int, folder: Path):
    """Train a whitespace-split BPE tokenizer with <unk>/<s>/</s>/<pad> and save it to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    # prepend BOS like Llama tokenizers do, so prompt/response masking is exercised realistically
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def save_tiny_llama(folder: Path, texts: Iterable[str], *, hidden: int = 32, layers: int = 2, vocab: int = 128,
                    intermediate: int | None = None, heads: int = 4, seed: int = 0) -> Path:
    """A random Llama with a tokenizer trained on ``texts``, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = train_tiny_tokenizer(texts, vocab, folder)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=len(tok),
        max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
