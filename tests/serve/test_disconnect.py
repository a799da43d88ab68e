"""A client that goes away stops its generation: streaming or not, the request is aborted (counted
in /metrics), generates no more, and its KV blocks are back in the pool."""

import socket
import time

from tests.serve.test_concurrency import wait_until_idle

LONG = {"model": "tiny-serve", "prompt": "Hello, how are you today?", "max_tokens": 1800, "temperature": 0}


def hang_up(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def assert_stopped_early(server, before, received_tokens: int) -> None:
    after = wait_until_idle(server, timeout_s=10)
    assert after["llmrun_requests_aborted_total"] == before["llmrun_requests_aborted_total"] + 1
    generated = after["llmrun_generation_tokens_total"] - before["llmrun_generation_tokens_total"]
    assert received_tokens <= generated < LONG["max_tokens"] / 3, generated
    assert after["llmrun_kv_blocks_used"] == 0
    time.sleep(0.5)  # and nothing runs on afterwards
    assert server.metrics()["llmrun_generation_tokens_total"] == after["llmrun_generation_tokens_total"]


def test_leaving_mid_stream_aborts_the_request(server):
    before = wait_until_idle(server)
    sock = server.open_raw("/v1/completions", {**LONG, "stream": True})
    received = b""
    while received.count(b"data: {") < 5:
        data = sock.recv(65536)
        assert data, "the stream ended before the client left"
        received += data
    assert received.startswith(b"HTTP/1.1 200")
    hang_up(sock)
    assert_stopped_early(server, before, 5)


def test_leaving_while_waiting_for_a_whole_reply_aborts_the_request(server):
    before = wait_until_idle(server)
    sock = server.open_raw("/v1/completions", LONG)
    deadline = time.monotonic() + 30
    while server.metrics()["llmrun_generation_tokens_total"] < before["llmrun_generation_tokens_total"] + 5:
        assert time.monotonic() < deadline, "the request never started generating"
        time.sleep(0.01)
    hang_up(sock)
    assert_stopped_early(server, before, 5)
