"""Tiny language models with a real (character-level) tokenizer, for evaluation tests."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in [chr(x) for x in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def save_tiny_lm(path: Path, seed: int = 0, **overrides) -> Path:
    """A random Llama (hidden 32, 2 layers, vocab 128, context 64) with the character tokenizer."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(seed)
    cfg = tiny_llama_config(bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def save_tiny_classifier(path: Path, num_labels: int = 3, seed: int = 0) -> Path:
    from transformers import LlamaForSequenceClassification

    from conftest import tiny_llama_config

    torch.manual_seed(seed)
    cfg = tiny_llama_config(bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=num_labels)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
