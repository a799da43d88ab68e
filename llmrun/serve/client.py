"""`llmrun run --url`: one prompt sent to a running llmrun (or any OpenAI-compatible) server, the
reply streamed to stdout as it comes (standard library HTTP only: nothing loads a model here)."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator, Optional

from llmrun.errors import ServerError, UsageError

TIMEOUT_S = 600  # between two bytes of the reply


@dataclass
class RemoteReply:
    """What came back: the text, why it ended, the server's usage, and the client's timings."""

    text: str = ""
    finish_reason: Optional[str] = None
    usage: dict = field(default_factory=dict)
    started_s: float = 0.0
    first_token_s: Optional[float] = None
    finished_s: Optional[float] = None


def request_body(model: str, prompt: str, *, system: Optional[str], raw: bool, params) -> tuple[str, dict]:
    """The endpoint and body: chat completions (the server applies the chat template) or, with
    --raw, completions; llmrun's own sampling options ride as extra fields."""
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p if params.top_p is not None else 1.0, "top_k": params.top_k or 0,
            "min_p": params.min_p or 0.0, "repetition_penalty": params.repetition_penalty}
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if raw:
        if system:
            raise UsageError("--system needs the chat template; drop --raw or --system")
        return "/v1/completions", {**body, "prompt": prompt}
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return "/v1/chat/completions", {**body, "messages": messages}


def stream_reply(url: str, path: str, body: dict, api_key: Optional[str]) -> Iterator[tuple[str, RemoteReply]]:
    """POST the body and yield (new text, reply so far) as server-sent events arrive."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    endpoint = url.rstrip("/") + path
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
    reply = RemoteReply(started_s=time.perf_counter())
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise ServerError(f"{endpoint} answered {err.code}: {_error_message(err.read())}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ServerError(f"cannot reach {endpoint}: {getattr(err, 'reason', err)}") from None
    with response:
        for data in _events(response, endpoint):
            if data.get("error"):
                raise ServerError(f"{endpoint} failed mid-reply: {_error_message(json.dumps(data).encode())}")
            if data.get("usage"):
                reply.usage = data["usage"]
            for choice in data.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
                if text:
                    reply.first_token_s = reply.first_token_s or time.perf_counter()
                    reply.text += text
                    yield text, reply
    reply.finished_s = time.perf_counter()
    if reply.finish_reason is None:
        raise ServerError(f"{endpoint} ended the reply without finishing it")
    yield "", reply


def _events(response, endpoint: str) -> Iterator[dict]:
    """The JSON of each `data:` line until `data: [DONE]` (or the end of the stream)."""
    try:
        for raw_line in response:
            line = raw_line.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            try:
                yield json.loads(data)
            except ValueError:
                raise ServerError(f"{endpoint} sent something that is not JSON: {data[:80]!r}") from None
    except (OSError, urllib.error.URLError) as err:
        raise ServerError(f"the connection to {endpoint} broke: {err}") from None


def _error_message(raw: bytes) -> str:
    """OpenAI's error message (or Ollama's), else the body's first line."""
    try:
        data = json.loads(raw)
        error = data.get("error", data)
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        text = raw.decode("utf-8", "replace").strip()
        return text.splitlines()[0][:200] if text else "(no body)"


def refuse_local_options(given: dict[str, bool]) -> None:
    """Options that shape a local run (placement, batching) mean nothing with --url: refused, not ignored."""
    names = [name for name, is_given in given.items() if is_given]
    if names:
        raise UsageError(f"{', '.join(names)} cannot be used with --url: the server was started with its own "
                         f"(set them on `llmrun serve`)")


def run_remote(url: str, model: str, prompt: str, params, *, system: Optional[str], raw: bool, as_json: bool,
               quiet: bool) -> None:
    """Send one prompt and print the reply as `llmrun run` prints a local one ($LLMRUN_API_KEY as the key)."""
    from llmrun import settings
    from llmrun.display import ReplyView, print_stats

    api_key = settings.LLMRUN_API_KEY.text()
    path, body = request_body(model, prompt, system=system, raw=raw, params=params)
    reply = RemoteReply()
    if as_json:
        for _, reply in stream_reply(url, path, body, api_key):
            pass
        print(json.dumps({"model": model, "url": url, "text": reply.text, "finish_reason": reply.finish_reason,
                          "usage": reply.usage, "ttft_s": round(_ttft(reply), 4)}))
        return
    with ReplyView(live=sys.stdout.isatty()) as out:
        for text, reply in stream_reply(url, path, body, api_key):
            out.write(text)
    if not quiet:
        usage = reply.usage
        print_stats(f"{usage.get('prompt_tokens', '?')} prompt tokens "
                    f"({(usage.get('prompt_tokens_details') or {}).get('cached_tokens', 0)} cached), "
                    f"{usage.get('completion_tokens', '?')} generated ({reply.finish_reason}), "
                    f"first token {_ttft(reply):.2f} s, from {url}")


def _ttft(reply: RemoteReply) -> float:
    return (reply.first_token_s or reply.finished_s or reply.started_s) - reply.started_s
