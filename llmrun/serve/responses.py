"""The JSON the server sends: OpenAI's completion and chat objects, their stream chunks and usage,
and the server-sent-events framing."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from starlette.responses import JSONResponse

from llmrun.engine.sequence import FinishReason
from llmrun.serve.protocol import ApiError

DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: dict) -> bytes:
    """One server-sent event carrying `data` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def finish_name(reason: Optional[FinishReason]) -> Optional[str]:
    """OpenAI's finish_reason: an end-of-sequence token or a stop string is "stop"; a budget "length"."""
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


@dataclass
class Usage:
    """Token counts of one HTTP request: each prompt counted once however many choices it has."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class Envelope:
    """What every object of one response repeats: its id, kind, creation time and model."""

    kind: str                      # "completion" or "chat"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = new_id("cmpl" if self.kind == "completion" else "chatcmpl")

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, choices: list[dict], usage: Usage) -> dict:
        """The non-streamed response; `choices` hold index, text, finish_reason and logprobs."""
        if self.kind == "completion":
            shaped = [{"index": c["index"], "text": c["text"], "logprobs": c.get("logprobs"),
                       "finish_reason": c["finish_reason"]} for c in choices]
            return {**self._head("text_completion"), "choices": shaped, "usage": usage.as_dict()}
        shaped = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                   "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]} for c in choices]
        return {**self._head("chat.completion"), "choices": shaped, "usage": usage.as_dict()}

    def chunk(self, index: int, text: str, finish_reason: Optional[str], *, first: bool = False,
              logprobs: Optional[dict] = None) -> dict:
        """One streamed piece of choice `index` (chat's first piece carries the assistant role)."""
        if self.kind == "completion":
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            return {**self._head("text_completion"), "choices": [choice]}
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict:
        """The last chunk of a stream asked for usage: no choices, the request's usage."""
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {**self._head(obj), "choices": [], "usage": usage.as_dict()}


def error_event(message: str, kind: str = "server_error") -> bytes:
    """An error inside a stream that already began (OpenAI's SDK raises it as an APIError)."""
    return sse({"error": {"message": message, "type": kind, "param": None, "code": None}})


def error_response(err: ApiError, path: str) -> JSONResponse:
    """A refusal as its HTTP response, in the shape of the API the path belongs to."""
    return JSONResponse(err.body(path), status_code=err.status, headers=err.headers)
