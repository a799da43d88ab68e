"""Ollama's endpoints on the same loop, so tools written for Ollama work unchanged: POST
/api/generate and /api/chat (NDJSON streaming by default), GET /api/tags and /api/version."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llmrun import __version__
from llmrun.serve.live import LiveStream, until_done_or_gone
from llmrun.serve.protocol import ApiError, OllamaChatBody, OllamaGenerateBody, message_dicts, parse_body
from llmrun.serve.responses import error_response, finish_name, new_id
from llmrun.serve.running import ChoiceSpec, RunningRequest
from llmrun.serve.translate import chat_prompt, ollama_sampling

NDJSON = "application/x-ndjson"


def ollama_router(state) -> APIRouter:
    router = APIRouter()

    @router.get("/api/version")
    async def version():
        return {"version": __version__}

    @router.get("/api/tags")
    async def tags():
        loaded = state.loaded
        models = [] if loaded is None else [{"name": loaded.name, "model": loaded.name,
                                             "modified_at": _timestamp(loaded.created), "details": {}}]
        return {"models": models}

    @router.post("/api/generate")
    async def generate(request: Request):
        body = parse_body(await request.body(), OllamaGenerateBody)
        loaded = state.model_for(body.model)
        if body.raw:
            if body.system:
                raise ApiError(400, "system needs the chat template; drop raw or system", param="system")
            ids = loaded.tokenizer.encode(body.prompt)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else [])
            ids = chat_prompt(messages + [{"role": "user", "content": body.prompt}], loaded.tokenizer)
        return await _answer(state, request, body, ids, "response")

    @router.post("/api/chat")
    async def chat(request: Request):
        body = parse_body(await request.body(), OllamaChatBody)
        loaded = state.model_for(body.model)
        ids = chat_prompt(message_dicts(body.messages), loaded.tokenizer)
        return await _answer(state, request, body, ids, "message")

    return router


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _piece(body, field: str, text: str) -> dict:
    """One object of the reply: the text under `response` (generate) or `message` (chat)."""
    value = text if field == "response" else {"role": "assistant", "content": text}
    return {"model": body.model, "created_at": _timestamp(time.time()), field: value, "done": False}


def _last(body, field: str, running: RunningRequest, text: str) -> dict:
    """The final object: done, why, and Ollama's counts and durations (nanoseconds)."""
    result = running.results()[0]
    first = result.first_token_s or result.finished_s or result.started_s
    finished = result.finished_s or first
    return {**_piece(body, field, text), "done": True, "done_reason": finish_name(result.finish_reason),
            "total_duration": int((finished - running.arrived_s) * 1e9), "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens, "prompt_eval_duration": int((first - result.started_s) * 1e9),
            "eval_count": len(result.tokens), "eval_duration": int((finished - first) * 1e9)}


async def _answer(state, request: Request, body, ids: list[int], field: str) -> Response:
    loaded = state.loaded
    spec = ChoiceSpec(0, ids, ollama_sampling(body.options, len(ids), loaded.limits))
    running = RunningRequest(loaded.loop, [spec], state.metrics)
    request_id, endpoint = new_id("ollama"), request.url.path

    def on_end(status: int) -> None:
        state.log_request(request_id, endpoint, status, running)

    if body.stream:
        return LiveStream(_lines(running, body, field), running, NDJSON, on_end)
    try:
        text = await until_done_or_gone(request.receive, running, _text(running))
    finally:
        running.abort()
    if running.client_gone:
        on_end(499)
        return Response(status_code=499)
    if running.cut_short:
        on_end(503)
        return error_response(ApiError(503, running.cut_short, kind="server_error"), endpoint)
    on_end(200)
    return JSONResponse(_last(body, field, running, text))


async def _text(running: RunningRequest) -> str:
    return "".join([event.text async for _, event in running.events()])


async def _lines(running: RunningRequest, body, field: str) -> AsyncIterator[bytes]:
    async for _, event in running.events():
        if event.text:
            yield _line(_piece(body, field, event.text))
    if running.cut_short:
        yield _line({"error": running.cut_short})
    elif not running.client_gone:
        yield _line(_last(body, field, running, ""))


def _line(data: dict) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode() + b"\n"
