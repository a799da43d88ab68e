"""Token log probabilities in OpenAI's two shapes: the completions API's parallel lists and the
chat API's `content` entries (each token's text, its UTF-8 bytes, the likeliest alternatives)."""

from __future__ import annotations

from typing import Optional

from llmrun.engine.events import TokenEvent


class LogprobsShaper:
    """Turns a choice's TokenEvents into OpenAI's logprobs objects (`kind`: completion or chat).
    Each token's text is the token decoded alone; `text_offset` counts the completion's text."""

    def __init__(self, tokenizer, kind: str):
        self.tokenizer = tokenizer
        self.kind = kind
        self.offset = 0

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def piece(self, event: TokenEvent, emitted_text: str) -> dict:
        """The logprobs of one event's token (a stream chunk's, or one item to merge)."""
        text = self._text(event.token_id)
        if self.kind == "chat":
            top = [{"token": self._text(t), "logprob": lp, "bytes": list(self._text(t).encode())}
                   for t, lp in event.top_logprobs]
            return {"content": [{"token": text, "logprob": event.logprob, "bytes": list(text.encode()),
                                 "top_logprobs": top}]}
        top = {self._text(t): lp for t, lp in event.top_logprobs}
        piece = {"tokens": [text], "token_logprobs": [event.logprob], "top_logprobs": [top],
                 "text_offset": [self.offset]}
        self.offset += len(emitted_text)
        return piece


def merge(pieces: list[dict]) -> Optional[dict]:
    """The pieces of a whole (non-streamed) choice joined into one logprobs object."""
    if not pieces:
        return None
    merged = {key: [] for key in pieces[0]}
    for piece in pieces:
        for key, values in piece.items():
            merged[key].extend(values)
    return merged
