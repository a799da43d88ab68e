"""Bad requests get a 4xx in OpenAI's error shape naming what is wrong, never a 500 or a traceback."""

import http.client
from urllib.parse import urlparse

import openai
import pytest
from openai import OpenAI

MODEL = "tiny-serve"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


def assert_openai_error(answer, status, *, param=None, code=None, fragment=""):
    got_status, body, _ = answer
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and fragment in error["message"], body
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, body
    if code is not None:
        assert error["code"] == code, body


def test_malformed_json_and_bodies_that_are_not_objects(server):
    assert_openai_error(server.post(CHAT, b'{"model": "tiny-serve", "messages": ['), 400, fragment="not valid JSON")
    assert_openai_error(server.post(CHAT, b"\xff\xfe"), 400, fragment="not valid JSON")
    assert_openai_error(server.post(CHAT, [1, 2]), 400, fragment="JSON object")


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "5"), ("temperature", "hot"), ("n", 1.5), ("stream", "yes"), ("stop", 3), ("seed", 2.5),
    ("top_p", [0.5]), ("messages", "Hello"),
])
def test_wrong_types_name_the_field(server, field, value):
    body = {"model": MODEL, "messages": HELLO, field: value}
    assert_openai_error(server.post(CHAT, body), 400, fragment=field)


@pytest.mark.parametrize("field, value, fragment", [
    ("temperature", -1, "temperature"), ("top_p", 1.5, "top_p"), ("max_tokens", 0, "max_tokens"),
    ("seed", -3, "seed"), ("n", 0, "n must be"), ("n", 17, "n must be"), ("presence_penalty", 0.5, "repetition_penalty"),
    ("frequency_penalty", -1.0, "not supported"), ("top_k", -2, "top_k"), ("stop", [""], "must not be empty"),
    ("tools", [{"type": "function"}], "tools"),
])
def test_values_out_of_range_or_unsupported(server, field, value, fragment):
    body = {"model": MODEL, "messages": HELLO, field: value}
    assert_openai_error(server.post(CHAT, body), 400, fragment=fragment)


def test_missing_fields_roles_and_content(server):
    assert_openai_error(server.post(CHAT, {"messages": HELLO}), 400, param="model")
    assert_openai_error(server.post(CHAT, {"model": MODEL}), 400, param="messages")
    assert_openai_error(server.post(CHAT, {"model": MODEL, "messages": []}), 400, param="messages")
    unknown_role = {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}
    assert_openai_error(server.post(CHAT, unknown_role), 400, fragment="unknown role")
    image = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    assert_openai_error(server.post(CHAT, image), 400, fragment="only text parts")
    assert_openai_error(server.post(COMPLETIONS, {"model": MODEL, "prompt": []}), 400, param="prompt")
    assert_openai_error(server.post(COMPLETIONS, {"model": MODEL, "prompt": [5, 99999]}), 400, param="prompt")


def test_unknown_model_is_404(server):
    assert_openai_error(server.post(CHAT, {"model": "gpt-9", "messages": HELLO}), 404, param="model",
                        code="model_not_found")
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=HELLO)


def test_prompt_longer_than_the_context_and_max_tokens_beyond_it(server):
    long_prompt = "a b c d e f g h " * 600  # far past the 2,048-token context
    assert_openai_error(server.post(COMPLETIONS, {"model": MODEL, "prompt": long_prompt}), 400,
                        code="context_length_exceeded", fragment="context window")
    too_many = {"model": MODEL, "prompt": "Hello", "max_tokens": 5000}
    assert_openai_error(server.post(COMPLETIONS, too_many), 400, param="max_tokens", code="context_length_exceeded")
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=5000)


def test_unknown_paths_and_methods_answer_in_the_same_shape(server):
    status, body, _ = server.post("/v1/embeddings", {"model": MODEL, "input": "x"})
    assert status == 404 and "error" in body
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("GET", CHAT)
    response = connection.getresponse()
    assert response.status == 405 and b'"error"' in response.read()


def test_no_request_here_left_a_traceback_in_the_server_log(server):
    server.post(CHAT, b"{")
    assert "Traceback" not in server.stderr
    assert " 500 " not in server.stderr
