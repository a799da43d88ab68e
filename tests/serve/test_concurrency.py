"""64 clients streaming at once: every request completes, each one's text equals its own run
alone (greedy), and afterwards the KV pool is whole again (read from /metrics)."""

import threading
import time

from openai import OpenAI

MODEL = "tiny-serve"
WORDS = "the capital of France is Paris and Italy has Rome while numbers go 0 1 2 3 4 5 6 7 8 9".split()


def prompt(i: int) -> str:
    """64 prompts of different lengths and words (some long enough to fill KV blocks)."""
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + (i * 7) % 61))


def wait_until_idle(server, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics["llmrun_requests_running"] == 0 and metrics["llmrun_requests_waiting"] == 0:
            return metrics
        time.sleep(0.05)
    raise AssertionError(f"still busy: {metrics}")


def test_64_concurrent_streams_each_equal_its_own_run_and_the_pool_is_whole(server):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    prompts = [prompt(i) for i in range(64)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).choices[0].text
             for p in prompts]
    before = wait_until_idle(server)
    texts, finishes, errors = [None] * 64, [None] * 64, []
    start = threading.Barrier(64)

    def stream(i):
        try:
            start.wait()
            pieces = []
            for chunk in client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}):
                if chunk.choices:
                    pieces.append(chunk.choices[0].text)
                    finishes[i] = chunk.choices[0].finish_reason or finishes[i]
            texts[i] = "".join(pieces)
        except Exception as err:  # reported below with the request's number
            errors.append((i, repr(err)))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert errors == []
    assert all(finish in ("stop", "length") for finish in finishes), finishes
    for i in range(64):
        assert texts[i] == alone[i], f"request {i}: among 64 it gave other text than alone"
    after = wait_until_idle(server)
    assert after["llmrun_kv_blocks_used"] == 0  # every block back: free, or cached for a prefix hit
    assert after["llmrun_kv_blocks_free"] + after["llmrun_kv_blocks_cached"] == after["llmrun_kv_blocks_total"]
    assert after["llmrun_requests_finished_total"] - before["llmrun_requests_finished_total"] == 64
    assert after["llmrun_requests_aborted_total"] == before["llmrun_requests_aborted_total"]
