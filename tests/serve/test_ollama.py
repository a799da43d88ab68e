"""Ollama's /api/generate and /api/chat on the same loop: NDJSON streaming by default, one object
with stream false, the same greedy text as the OpenAI endpoint for the same prompt."""

import http.client
import json
from urllib.parse import urlparse

from openai import OpenAI

MODEL = "tiny-serve"
MESSAGES = [{"role": "user", "content": "Hello, how are you?"}]
GREEDY = {"temperature": 0, "num_predict": 16}


def ndjson(server, path, body) -> list[dict]:
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type") == "application/x-ndjson"
    return [json.loads(line) for line in response.read().decode().splitlines()]


def openai_chat_text(server, max_tokens=16) -> str:
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def test_chat_streams_ndjson_and_equals_the_openai_reply(server):
    lines = ndjson(server, "/api/chat", {"model": MODEL, "messages": MESSAGES, "options": GREEDY})
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"]
    text = "".join(line["message"]["content"] for line in lines)
    assert text == openai_chat_text(server)
    last = lines[-1]
    assert last["done_reason"] in ("stop", "length") and last["eval_count"] >= 1
    assert last["prompt_eval_count"] > 0 and last["total_duration"] > 0


def test_generate_whole_and_streamed_agree(server):
    body = {"model": MODEL, "prompt": "Hello, how are you?", "options": GREEDY}
    status, whole, _ = server.post("/api/generate", {**body, "stream": False})
    assert status == 200 and whole["done"] is True
    lines = ndjson(server, "/api/generate", body)
    assert "".join(line["response"] for line in lines) == whole["response"]
    assert whole["response"] == openai_chat_text(server)  # generate applies the chat template too
    raw = server.post("/api/generate", {**body, "raw": True, "stream": False})[1]
    assert raw["prompt_eval_count"] < whole["prompt_eval_count"]  # no template around the prompt


def test_tags_version_and_errors_in_ollamas_shape(server):
    assert [m["name"] for m in json.loads(server.get("/api/tags")[1])["models"]] == [MODEL]
    assert "version" in json.loads(server.get("/api/version")[1])
    status, body, _ = server.post("/api/chat", {"model": "llama9", "messages": MESSAGES})
    assert status == 404 and isinstance(body["error"], str)
    status, body, _ = server.post("/api/generate", {"model": MODEL, "prompt": "x", "options": {"temperature": -1}})
    assert status == 400 and "options.temperature" in body["error"]
