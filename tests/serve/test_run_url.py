"""`llmrun run --url`: the reply of a running server streamed to stdout, as a local run prints it."""

import json

from openai import OpenAI

from tests.cli.helpers import assert_one_line_error, run_cli

MODEL = "tiny-serve"


def test_run_url_prints_the_servers_reply(server, tmp_path):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    want = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=12, temperature=0).choices[0].message.content
    proc = run_cli(["run", MODEL, "Hello there", "--url", server.url, "-t", "0", "-n", "12"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == want.rstrip("\n")
    assert "prompt tokens" in proc.stderr and server.url in proc.stderr
    as_json = run_cli(["run", MODEL, "--url", server.url, "-t", "0", "-n", "12", "--json"], tmp_path,
                      stdin="Hello there")
    data = json.loads(as_json.stdout)
    assert data["text"] == want and data["usage"]["completion_tokens"] >= 1


def test_run_url_raw_uses_completions(server, tmp_path):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    want = client.completions.create(model=MODEL, prompt="Numbers: 1 2", max_tokens=10, temperature=0).choices[0].text
    proc = run_cli(["run", MODEL, "Numbers: 1 2", "--raw", "--url", server.url, "-t", "0", "-n", "10", "-q"],
                   tmp_path)
    assert proc.returncode == 0 and proc.stdout.rstrip("\n") == want.rstrip("\n") and proc.stderr == ""


def test_run_url_errors_are_one_line(server, tmp_path):
    assert_one_line_error(run_cli(["run", "gpt-9", "hi", "--url", server.url], tmp_path), "does not exist")
    assert_one_line_error(run_cli(["run", MODEL, "hi", "--url", "http://127.0.0.1:9"], tmp_path), "cannot reach")
    assert_one_line_error(run_cli(["run", MODEL, "--url", server.url, "--each-line"], tmp_path, stdin="a\n"),
                          "--each-line")
    assert_one_line_error(run_cli(["run", MODEL, "hi", "--url", server.url, "--ctx", "64"], tmp_path),
                          "--ctx")
