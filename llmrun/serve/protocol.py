"""The request bodies the server accepts (OpenAI's and Ollama's), parsed strictly, and ApiError:
every refusal in OpenAI's error shape, with its HTTP status."""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self, path: str = "/v1/") -> dict:
        """OpenAI's error object; under Ollama's /api/, Ollama's plain {"error": message}."""
        if path.startswith("/api/"):
            return {"error": self.message}
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    """Strict types (a string is not a number); fields the server does not know are ignored, as
    OpenAI's SDKs send new ones before every server knows them."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """What completions and chat share: OpenAI's sampling fields plus llmrun's own extras."""

    model: str
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    top_logprobs: Optional[int] = None
    user: Optional[str] = None
    # llmrun's own, as extra fields (extra_body in OpenAI's SDK)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class Message(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatBody(SamplingFields):
    messages: list[Message]
    logprobs: bool = False
    tools: Optional[list[Any]] = None
    response_format: Optional[dict] = None


class OllamaOptions(_Body):
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    seed: Optional[int] = None
    num_predict: Optional[int] = None
    stop: Optional[list[str]] = None


class OllamaGenerateBody(_Body):
    model: str
    prompt: str = ""
    system: Optional[str] = None
    raw: bool = False
    stream: bool = True
    options: Optional[OllamaOptions] = None


class OllamaChatBody(_Body):
    model: str
    messages: list[Message]
    stream: bool = True
    options: Optional[OllamaOptions] = None


ROLES = ("system", "user", "assistant", "tool", "developer")


def parse_body(raw: bytes, body_class: type[_Body]):
    """The request body read as `body_class`; malformed JSON or a field of the wrong type is a 400
    naming the field, never a 500."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return body_class.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from None


def message_dicts(messages: list[Message]) -> list[dict]:
    """Messages as the chat template takes them: text content only (a list of text parts joined)."""
    rendered = []
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise ApiError(400, f"messages.{index}.role: unknown role {message.role!r}; one of {', '.join(ROLES)}",
                           param=f"messages.{index}.role")
        content = message.content
        if isinstance(content, list):
            others = [part.type for part in content if part.type != "text"]
            if others:
                raise ApiError(400, f"messages.{index}.content: only text parts are supported, got {others[0]!r}",
                               param=f"messages.{index}.content")
            content = "".join(part.text or "" for part in content)
        rendered.append({"role": message.role, "content": content or ""})
    if not rendered:
        raise ApiError(400, "messages must hold at least one message", param="messages")
    return rendered
