"""The server's life: /health 503 while loading then 200, one log line per request, no CPU used
while idle, SIGTERM finishing or cancelling what runs and exiting cleanly, and the one-line
errors of a server that cannot start."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from openai import OpenAI

from tests.cli.helpers import assert_one_line_error, assert_usage_error, cli_env, run_cli
from tests.serve.remote import RemoteServer

MODEL = "tiny-serve"


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def test_health_is_503_while_loading_then_200_and_idle_uses_no_cpu(serve_model, tmp_path):
    remote = RemoteServer(serve_model, tmp_path, "--dtype", "float32", "--api-key", "k1")
    try:
        status, body = remote.get("/health")  # asked as soon as it listens: the weights are still loading
        assert status == 503 and json.loads(body)["status"] == "loading"
        assert remote.post("/v1/completions", {"model": MODEL, "prompt": "Hi"},
                           {"Authorization": "Bearer k1"})[0] == 503
        remote.wait_ready()
        client = OpenAI(base_url=remote.url + "/v1", api_key="k1", max_retries=0)  # --api-key works as the variable
        reply = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0)
        log = remote.lines_with(reply.id)
        assert len(log) == 1 and "/v1/completions 200" in log[0], remote.stderr
        assert f"completion={reply.usage.completion_tokens}" in log[0], log
        time.sleep(1.0)  # let OpenMP's threads go to sleep after the request
        used = cpu_seconds(remote.proc.pid)
        time.sleep(3.0)
        idle = cpu_seconds(remote.proc.pid) - used
        assert idle < 0.15, f"an idle server used {idle:.2f} s of CPU in 3 s"
    finally:
        remote.stop()


def test_sigterm_lets_short_requests_finish_cancels_long_ones_and_exits_cleanly(serve_model, tmp_path):
    remote = RemoteServer(serve_model, tmp_path, "--dtype", "float32", "--shutdown-grace", "1").wait_ready()
    client = OpenAI(base_url=remote.url + "/v1", api_key="unused", max_retries=0)
    short_done, long_end = [], []

    def short():  # finishes within the grace
        short_done.append(client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0))

    def long():  # outlasts the grace (2,000 steps): cancelled, the stream ends with an error event
        try:
            for _ in client.completions.create(model=MODEL, prompt="Hello", max_tokens=2000, temperature=0,
                                               stream=True):
                pass
            long_end.append("finished")
        except Exception as err:  # the openai client raises the error event
            long_end.append(str(err))

    threads = [threading.Thread(target=long), threading.Thread(target=short)]
    threads[0].start()
    while remote.metrics()["llmrun_requests_running"] < 1:
        time.sleep(0.01)
    threads[1].start()
    while remote.metrics()["llmrun_requests_running"] < 2 and not short_done:
        time.sleep(0.01)
    started = time.monotonic()
    assert remote.stop(signal.SIGTERM, timeout_s=60) == 0
    took = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    assert short_done and short_done[0].choices[0].finish_reason in ("stop", "length")
    assert long_end and "shutting down" in long_end[0], long_end
    assert took < 15, took
    assert "Traceback" not in remote.stderr and "ERROR" not in remote.stderr, remote.stderr
    assert remote.lines[-1].strip() == "llmrun: stopped", remote.stderr


def test_sigint_on_an_idle_server_exits_at_once(serve_model, tmp_path):
    remote = RemoteServer(serve_model, tmp_path, "--dtype", "float32").wait_ready()
    started = time.monotonic()
    assert remote.stop(signal.SIGINT, timeout_s=30) == 0
    assert time.monotonic() - started < 5
    assert "Traceback" not in remote.stderr


def test_a_taken_port_is_one_error_line(serve_model, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(["serve", serve_model, "--port", port], tmp_path)
    assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}")


def test_an_unknown_model_fails_before_listening(tmp_path):
    proc = run_cli(["serve", "no-such-model-anywhere", "--port", "0"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "serving" not in proc.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--port", "70000"], "--port"), (["--port", "http"], "--port"), (["--max-waiting", "0"], "--max-waiting"),
    (["--max-body-size", "lots"], "--max-body-size"), (["--batch", "0"], "--batch"),
    (["--shutdown-grace", "-1"], "--shutdown-grace"),
])
def test_serve_usage_errors(serve_model, tmp_path, args, fragment):
    assert_usage_error(run_cli(["serve", serve_model, *args], tmp_path), fragment)


def test_serve_help_names_its_options(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmrun", "serve", "--help"], capture_output=True, text=True,
                          env=cli_env(tmp_path), timeout=120)
    assert proc.returncode == 0
    for option in ("--host", "--port", "--api-key", "--max-waiting", "--max-body-size", "--shutdown-grace",
                   "--batch", "--ctx", "--dtype", "--gpu-mem", "--cpu-mem"):
        assert option in proc.stdout, option
