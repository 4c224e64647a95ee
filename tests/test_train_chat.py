"""Chat data (``messages`` JSONL, TRL's conversational format): rendered with the tokenizer's chat
template, labels on the assistant turns only (checked token by token against a hand-built
expectation), and clear refusals for a tokenizer without a template or a template that rewrites
earlier turns."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapt_util import tiny_lm  # noqa: F401
from typer.testing import CliRunner

from deltawise.adapt.data import IGNORE_INDEX, Collator, read_examples, tokenize
from deltawise.adapt.train import load_tokenizer
from deltawise.cli import app
from deltawise.errors import InputError

# Llama-2-like: every turn is "<s>ROLE\nCONTENT</s>\n"; the generation prompt is the assistant header
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
# like templates that drop earlier reasoning: an assistant turn renders differently once another follows
REWRITING = ("{% for m in messages %}<s>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}short"
             "{% else %}{{ m['content'] }}{% endif %}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "Simple is better."},
    {"role": "user", "content": "Is flat better than nested?"},
    {"role": "assistant", "content": "Flat is better than nested."},
    {"role": "user", "content": "And sparse?"},
    {"role": "assistant", "content": "Sparse is better than dense."},
]


@pytest.fixture(scope="module")
def chat_model(tiny_lm, tmp_path_factory):  # noqa: F811
    """The tiny Llama with a chat template in its tokenizer, and a messages JSONL."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_lm["model"], folder)
    tok = load_tokenizer(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    data = folder.parent / "chat.jsonl"
    second = [{"role": "user", "content": "Is explicit better?"}, {"role": "assistant", "content": "Explicit is better."}]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (CONVERSATION, second) * 4))
    return {"model": folder, "data": data}


def _hand_built(tok) -> tuple[list[int], list[int]]:
    """ids and labels built piece by piece: the tokenizer splits on whitespace, so a turn's tokens are
    <s>, the role's, the content's, </s>; labels copy the content and </s> of assistant turns."""
    ids, labels = [], []
    for m in CONVERSATION:
        head = [tok.bos_token_id] + tok(m["role"], add_special_tokens=False)["input_ids"]
        body = tok(m["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += head + body
        labels += [IGNORE_INDEX] * len(head) + (body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body))
    return ids, labels


def test_labels_cover_assistant_turns_token_by_token(chat_model, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    tok = load_tokenizer(chat_model["model"])
    row = tokenize(read_examples(data), tok, 256, "causal_lm")[0]
    ids, labels = _hand_built(tok)
    assert row["input_ids"] == ids
    assert row["labels"] == labels
    learned = [tok.decode([t]) for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
    assert "".join(learned).replace("</s>", "|") == "Flatisbetterthannested.|Sparseisbetterthandense.|"
    # truncation inside the first reply keeps the labels aligned with the ids
    width = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX) + 2
    cut = tokenize(read_examples(data), tok, width, "causal_lm")[0]
    assert cut["input_ids"] == ids[:width] and cut["labels"] == labels[:width]


def test_the_model_loss_is_the_mean_over_assistant_tokens(chat_model):
    import torch.nn.functional as F
    from adapt_util import base_model

    tok = load_tokenizer(chat_model["model"])
    batch = Collator(tok.pad_token_id, "causal_lm")(tokenize(read_examples(chat_model["data"]), tok, 256, "causal_lm"))
    with torch.no_grad():
        out = base_model(chat_model["model"])(**batch)
    nll = -F.log_softmax(out.logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    assistant = batch["labels"][:, 1:] != IGNORE_INDEX
    assert 0 < assistant.sum() < batch["attention_mask"].sum() / 2
    torch.testing.assert_close(out.loss, nll[assistant].mean(), atol=1e-5, rtol=1e-5)


def test_cli_trains_on_chat_data(chat_model, tmp_path):
    res = CliRunner().invoke(app, ["train", str(chat_model["model"]), "--data", str(chat_model["data"]), "-o",
                                   str(tmp_path / "out"), "-p", "rank=2", "--max-steps", "2", "--batch-size", "4", "-q"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "out" / "training_log.json").read_text())) == 2


def test_a_tokenizer_without_chat_template_is_refused(tiny_lm, chat_model):  # noqa: F811
    tok = load_tokenizer(tiny_lm["model"])
    with pytest.raises(InputError, match="has no chat template"):
        tokenize(read_examples(chat_model["data"]), tok, 256, "causal_lm")


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_model):
    tok = load_tokenizer(chat_model["model"])
    tok.chat_template = REWRITING
    with pytest.raises(InputError, match="renders an assistant turn differently"):
        tokenize(read_examples(chat_model["data"]), tok, 256, "causal_lm")


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "no 'assistant' message"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "string 'content'"),
    ([{"content": "hi"}], "string 'role'"),
])
def test_bad_messages_name_the_line(tmp_path, messages, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(InputError, match=message) as info:
        read_examples(data)
    assert f"{data}:2" in str(info.value)
