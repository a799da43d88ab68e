"""Prompt token ids: the model's chat template, or raw text tokenized as transformers does."""

from __future__ import annotations

from typing import Optional, Sequence

from llmrun.errors import UsageError


def has_chat_template(tokenizer) -> bool:
    return bool(tokenizer.chat_template)


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Render messages with the chat template (plus the assistant header) and tokenize."""
    text = tokenizer.render_chat(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(tokenizer, text: str, *, system: Optional[str] = None, raw: bool = False) -> list[int]:
    """Token ids for a one-shot prompt. `raw` tokenizes the text as transformers' `tokenizer(text)`
    does (with the tokenizer's own special tokens)."""
    if raw:
        if system:
            raise UsageError("--system needs the chat template; drop --raw or --system")
        return tokenizer.encode(text)
    if not has_chat_template(tokenizer):
        raise UsageError("this model has no chat template; use --raw to send the prompt as plain text")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    return chat_prompt_ids(tokenizer, messages)
