"""Who and what gets in: the API key (compared in constant time) and the body-size limit."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Optional

from llmrun.serve.protocol import ApiError

GUARDED_PREFIXES = ("/v1/", "/api/")  # OpenAI's and Ollama's endpoints; /health and /metrics stay open


def key_matches(given: str, expected: str) -> bool:
    """Constant time whatever the inputs: both sides are hashed to the same length first, so
    neither the key's characters nor its length show in the time taken."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


class Guard:
    """ASGI middleware in front of the app: `/v1` and `/api` requests need `Authorization: Bearer
    KEY` when a key is set, and no request body may exceed `max_body_bytes` (checked on the
    declared length and again on the bytes as they arrive)."""

    def __init__(self, app, *, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await send_error(send, refusal, scope["path"])
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counted_receive, send)

    def _refusal(self, scope) -> Optional[ApiError]:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith(GUARDED_PREFIXES):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip(), self.api_key):
                return ApiError(401, "missing or incorrect API key: send Authorization: Bearer KEY",
                                code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes",
                        code="request_too_large")


async def send_error(send, error: ApiError, path: str) -> None:
    """Answer with `error` (in the shape of the path's API) straight from the ASGI layer."""
    body = json.dumps(error.body(path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

