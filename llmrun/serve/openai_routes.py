"""OpenAI's endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions, whole or
streamed as server-sent events (ending in `data: [DONE]`, a usage chunk first when asked)."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llmrun.serve.live import LiveStream, until_done_or_gone
from llmrun.serve.logprobs import LogprobsShaper, merge
from llmrun.serve.protocol import ApiError, ChatBody, CompletionBody, parse_body
from llmrun.serve.responses import DONE, Envelope, error_event, error_response, finish_name, sse
from llmrun.serve.running import ChoiceSpec, RunningRequest
from llmrun.serve.translate import (
    chat_body_prompt, completion_prompts, openai_sampling, refuse_unsupported,
)


def openai_router(state) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state.require_loaded())]}

    @router.get("/v1/models/{name:path}")
    async def model(name: str):
        return _model_card(state.model_for(name))

    @router.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await request.body(), CompletionBody)
        loaded = state.model_for(body.model)
        refuse_unsupported(body)
        prompts = completion_prompts(body, loaded.tokenizer, loaded.limits)
        return await _answer(state, request, Envelope("completion", body.model), body, prompts)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await request.body(), ChatBody)
        loaded = state.model_for(body.model)
        refuse_unsupported(body)
        prompts = [chat_body_prompt(body, loaded.tokenizer)]
        return await _answer(state, request, Envelope("chat", body.model), body, prompts)

    return router


def _model_card(loaded) -> dict:
    return {"id": loaded.name, "object": "model", "created": loaded.created, "owned_by": "llmrun",
            "max_model_len": loaded.limits.max_context}


async def _answer(state, request: Request, envelope: Envelope, body, prompts: list[list[int]]) -> Response:
    """Run choice c of prompt p as choice p * n + c; answer whole or streamed."""
    loaded = state.loaded
    specs = [ChoiceSpec(p, ids, openai_sampling(body, len(ids), loaded.limits, c))
             for p, ids in enumerate(prompts) for c in range(body.n)]
    running = RunningRequest(loaded.loop, specs, state.metrics)
    shapers = [LogprobsShaper(loaded.tokenizer, envelope.kind) if spec.params.logprobs is not None else None
               for spec in specs]
    endpoint = request.url.path

    def on_end(status: int) -> None:
        state.log_request(envelope.id, endpoint, status, running)

    if body.stream:
        return LiveStream(_chunks(running, envelope, shapers, body.include_usage), running, "text/event-stream",
                          on_end)
    try:
        texts, pieces = await until_done_or_gone(request.receive, running, _collect(running, shapers))
    finally:
        running.abort()
    if running.client_gone:
        on_end(499)
        return Response(status_code=499)  # nobody reads it
    if running.cut_short:
        on_end(503)
        return error_response(ApiError(503, running.cut_short, kind="server_error"), endpoint)
    choices = [{"index": i, "text": text, "finish_reason": finish_name(result.finish_reason),
                "logprobs": merge(piece_list)}
               for i, (text, piece_list, result) in enumerate(zip(texts, pieces, running.results()))]
    on_end(200)
    return JSONResponse(envelope.whole(choices, running.usage()))


async def _collect(running: RunningRequest, shapers: list) -> tuple[list[str], list[list[dict]]]:
    """Each choice's whole text, and its logprobs pieces when asked for."""
    texts, pieces = [""] * len(running.specs), [[] for _ in running.specs]
    async for index, event in running.events():
        texts[index] += event.text
        if shapers[index] is not None:
            pieces[index].append(shapers[index].piece(event, event.text))
    return texts, pieces


async def _chunks(running: RunningRequest, envelope: Envelope, shapers: list,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """The stream: chat's role chunk per choice first, then each token's text (the last piece of a
    choice carries its finish_reason), the usage chunk when asked, then [DONE]. Cut short by a
    shutdown or a failed step, it ends with an error event instead."""
    if envelope.kind == "chat":
        for index in range(len(running.specs)):
            yield sse(envelope.chunk(index, "", None, first=True))
    async for index, event in running.events():
        reason = finish_name(event.finish_reason)
        logprobs = shapers[index].piece(event, event.text) if shapers[index] is not None else None
        if event.text or reason or logprobs:
            yield sse(envelope.chunk(index, event.text, reason, logprobs=logprobs))
    if running.cut_short:
        yield error_event(running.cut_short)
        return
    if running.client_gone:
        return
    if include_usage:
        yield sse(envelope.usage_chunk(running.usage()))
    yield DONE
