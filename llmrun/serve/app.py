"""The FastAPI app and the state it serves from: the model once loaded (503 before), the engine
loop, the metrics, and every refusal in OpenAI's (or Ollama's) error shape."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from llmrun.serve.guard import Guard
from llmrun.serve.metrics import CONTENT_TYPE, ServerMetrics
from llmrun.serve.protocol import ApiError
from llmrun.serve.responses import error_response
from llmrun.serve.translate import ModelLimits

log = logging.getLogger("llmrun.serve")


@dataclass(frozen=True)
class ServeConfig:
    """How the server guards itself (all from the command line)."""

    api_key: Optional[str]
    max_body_bytes: int


@dataclass
class Loaded:
    """The model being served: its names, the engine loop, its tokenizer and limits."""

    name: str
    aliases: tuple[str, ...]
    loop: object
    tokenizer: object
    limits: ModelLimits
    created: int


class ServerState:
    """Everything a request handler reads. `loaded` is None while the model loads (503); once
    `shutting_down`, new requests get 503 while those running finish or are cancelled."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.loaded: Optional[Loaded] = None
        self.shutting_down = False
        self.metrics = ServerMetrics(lambda: self.loaded.loop.stats() if self.loaded else None)

    def require_loaded(self) -> Loaded:
        """The loaded model; 503 with Retry-After while it loads."""
        if self.loaded is None:
            raise ApiError(503, "the model is still loading; retry shortly", kind="server_error",
                           code="model_loading", headers={"retry-after": "1"})
        return self.loaded

    def model_for(self, requested: str) -> Loaded:
        """The loaded model when `requested` names it; 503 while loading or stopping, 404 for another name."""
        loaded = self.require_loaded()
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
        if requested not in (loaded.name, *loaded.aliases):
            raise ApiError(404, f"the model {requested!r} does not exist on this server; it serves "
                                f"{loaded.name!r}", param="model", code="model_not_found")
        return loaded

    def log_request(self, request_id: str, endpoint: str, status: int, running=None) -> None:
        """One line per request: id, endpoint, status, tokens and times."""
        self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        if running is None:
            log.info("%s %s %d", request_id, endpoint, status)
            return
        usage = running.usage()
        ttft = running.ttft_s
        log.info("%s %s %d prompt=%d cached=%d completion=%d ttft=%s total=%.3fs", request_id, endpoint, status,
                 usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
                 "-" if ttft is None else f"{ttft:.3f}s", time.perf_counter() - running.arrived_s)


def create_app(state: ServerState, lifespan=None) -> Guard:
    """The ASGI app: FastAPI's routes behind the Guard (API key, body-size limit)."""
    from llmrun.serve.ollama_routes import ollama_router
    from llmrun.serve.openai_routes import openai_router

    app = FastAPI(title="llmrun", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        state.log_request("-", request.url.path, err.status)
        return error_response(err, request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):  # unknown path, wrong method
        return await api_error(request, ApiError(err.status_code, f"{request.method} {request.url.path}: "
                                                                   f"{err.detail}", code=None,
                                                 headers=dict(err.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(err).__name__, err)
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", kind="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        if state.loaded is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.loaded.name})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    app.include_router(openai_router(state))
    app.include_router(ollama_router(state))
    return Guard(app, api_key=state.config.api_key, max_body_bytes=state.config.max_body_bytes)
