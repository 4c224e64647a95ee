"""Chat data: ``messages`` records (the conversational format TRL's ``SFTTrainer`` takes) rendered with
the tokenizer's chat template, with the loss on the assistant turns only.

A record is ``{"messages": [{"role": "system" | "user" | "assistant" | ..., "content": "..."}, ...]}``.
The whole conversation is rendered once and tokenized; assistant turn ``i`` covers the tokens between the
rendering of the turns before it followed by the generation prompt (``add_generation_prompt=True``) and
the rendering that ends with it. So the label tokens are exactly what the model is asked to produce
after the template's assistant header: the reply and the template's end-of-turn marker. Every other
token (system, user, the role headers) is labelled ``IGNORE_INDEX``.

A template that renders a turn differently once later turns follow (some hide earlier reasoning) has
no such prefix structure; it is refused rather than guessed at.
"""

from __future__ import annotations

from typing import Any

from deltawise.errors import InputError

IGNORE_INDEX = -100  # the label value transformers' losses skip

Messages = tuple[tuple[str, str], ...]


def parse_messages(value: Any, where: str) -> Messages:
    """``messages`` of a record as (role, content) pairs; InputError naming the record for a bad shape."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} objects")
    pairs = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f"{where}: message {i} needs a string 'role' (system, user, assistant, ...)")
        if not isinstance(message.get("content"), str):
            raise InputError(f"{where}: message {i} needs a string 'content' (lists of content parts are not read)")
        pairs.append((message["role"], message["content"]))
    if not any(role == "assistant" for role, _ in pairs):
        raise InputError(f"{where}: no 'assistant' message: nothing to learn from")
    return tuple(pairs)


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the data holds chat 'messages', but the model's tokenizer has no chat template "
                         "(tokenizer_config.json 'chat_template' or chat_template.jinja); train from an instruct "
                         "model's tokenizer, or give 'prompt'/'response' records instead")


def _render(tokenizer, conversation: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 errors, or a template's raise_exception("...")
        raise InputError(f"the tokenizer's chat template refused a conversation: {exc}") from None


def _ids(tokenizer, text: str) -> list[int]:
    # the template writes BOS and the other special tokens itself
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_row(messages: Messages, tokenizer, max_length: int) -> dict[str, list[int]] | None:
    """``input_ids`` of the rendered conversation and ``labels`` that copy them on assistant turns only,
    cut to ``max_length``; None when no assistant token is left in the window."""
    conversation = [{"role": role, "content": content} for role, content in messages]
    full = _render(tokenizer, conversation, False)
    ids = _ids(tokenizer, full)
    labels = [IGNORE_INDEX] * len(ids)
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before = _render(tokenizer, conversation[:i], True)
        through = _render(tokenizer, conversation[: i + 1], False)
        start, end = _ids(tokenizer, before), _ids(tokenizer, through)
        if not (full.startswith(through) and through.startswith(before)
                and ids[: len(end)] == end and end[: len(start)] == start):
            raise InputError("the tokenizer's chat template renders an assistant turn differently once later turns "
                             "follow, so its tokens cannot be found in the conversation; train on 'prompt'/'response' "
                             "records instead")
        labels[len(start) : len(end)] = end[len(start) :]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels) or len(ids) < 2:
        return None
    return {"input_ids": ids, "labels": labels}
