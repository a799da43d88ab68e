"""Nobody let in without the key, no body past the limit, no queue past its bound (429 with
Retry-After), on a server started with LLMRUN_API_KEY, one sequence at a time, one waiting."""

import http.client
import json
import socket
import time
from urllib.parse import urlparse

import openai
import pytest
from openai import OpenAI

from tests.serve.remote import RemoteServer
from tests.serve.test_concurrency import wait_until_idle

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = {"model": "tiny-serve", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def guarded(serve_model, tmp_path_factory):
    remote = RemoteServer(serve_model, tmp_path_factory.mktemp("guarded-home"), "--dtype", "float32",
                          "--batch", "1", "--max-waiting", "1", "--max-body-size", "4KB",
                          env={"LLMRUN_API_KEY": KEY})
    try:
        yield remote.wait_ready()
    finally:
        remote.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}])
def test_v1_and_api_need_the_key(guarded, headers):
    for path, body in (("/v1/chat/completions", HELLO), ("/api/chat", {**HELLO, "stream": False})):
        status, answer, answer_headers = guarded.post(path, body, headers)
        assert status == 401, (path, answer)
        assert answer_headers.get("www-authenticate") == "Bearer"
    status, answer, _ = guarded.post("/v1/chat/completions", HELLO, headers)
    assert answer["error"]["code"] == "invalid_api_key"
    assert guarded.get("/v1/models", headers)[0] == 401


def test_the_key_lets_the_openai_client_in_and_health_stays_open(guarded):
    client = OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model="tiny-serve", messages=HELLO["messages"], max_tokens=4).choices
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert guarded.get("/health")[0] == 200
    assert guarded.get("/metrics")[0] == 200


def test_a_body_past_the_limit_is_413_declared_or_chunked(guarded):
    big = {**HELLO, "messages": [{"role": "user", "content": "x" * 5000}]}
    status, answer, _ = guarded.post("/v1/chat/completions", big, AUTH)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    url = urlparse(guarded.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    chunks = iter([json.dumps(big).encode()[i:i + 1000] for i in range(0, 6000, 1000)])
    connection.request("POST", "/v1/chat/completions", body=chunks, encode_chunked=True,
                       headers={**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    assert response.status == 413 and b"request_too_large" in response.read()


def _open_stream(guarded) -> socket.socket:
    body = {"model": "tiny-serve", "prompt": "Hello", "max_tokens": 1800, "temperature": 0, "stream": True}
    return guarded.open_raw("/v1/completions", body, AUTH)


def _wait_for(guarded, name, value, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while guarded.metrics()[name] != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.01)


def test_beyond_the_waiting_bound_is_429_with_retry_after(guarded):
    running = _open_stream(guarded)
    _wait_for(guarded, "llmrun_requests_running", 1)
    waiting = _open_stream(guarded)
    _wait_for(guarded, "llmrun_requests_waiting", 1)
    status, answer, headers = guarded.post("/v1/completions", {"model": "tiny-serve", "prompt": "Hi"}, AUTH)
    assert status == 429 and answer["error"]["code"] == "queue_full", answer
    assert int(headers["retry-after"]) >= 1
    client = OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny-serve", prompt="Hi", max_tokens=2)
    for sock in (waiting, running):
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    after = wait_until_idle(guarded, timeout_s=10)
    assert after["llmrun_kv_blocks_used"] == 0
    assert client.completions.create(model="tiny-serve", prompt="Hi", max_tokens=2).choices  # room again
