"""Answering with a running request: a streamed response whose client leaving aborts it at once
(not at the next write), and a whole response raced against the client's disconnect."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

from starlette.responses import Response

from llmrun.serve.running import RunningRequest, abort_when_gone


class LiveStream(Response):
    """Sends each chunk of `chunks` as it comes. A task beside it listens for the client's
    disconnect and aborts the request the moment it arrives; whatever ends the stream, the
    request is aborted (a no-op once finished) and `on_end(status)` is called once."""

    def __init__(self, chunks: AsyncIterator[bytes], running: RunningRequest, media_type: str,
                 on_end: Callable[[int], None]):
        # as Starlette's StreamingResponse: no body, so no content-length
        self.status_code, self.media_type, self.background = 200, media_type, None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.chunks = chunks
        self.running = running
        self.on_end = on_end

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(abort_when_gone(receive, self.running))
        status = 200
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away between two writes (uvicorn's ClientDisconnected)
            status = 499
        finally:
            watcher.cancel()
            self.running.abort()
            await _close(self.chunks)
            self.on_end(499 if self.running.client_gone else status)


async def _close(chunks) -> None:
    closer = getattr(chunks, "aclose", None)
    if closer is not None:
        await closer()


async def until_done_or_gone(receive, running: RunningRequest, work: Awaitable):
    """Await `work` (which consumes the request's events) while listening for the client's
    disconnect, which aborts the request; the result of `work` either way."""
    watcher = asyncio.ensure_future(abort_when_gone(receive, running))
    try:
        return await work
    finally:
        watcher.cancel()
