"""Bytes on stdin that are not UTF-8: every command that reads stdin decodes them leniently (U+FFFD)
and says so once on stderr, instead of ending in a UnicodeDecodeError traceback."""

import json
import subprocess
import sys

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import cli_env

NOTE = "stdin is not valid UTF-8"
BAD_BYTES = [b"caf\xe9 au lait\n", b"\xff\xfe\x00half a BOM\n", b"cut short \xe2\x82\n", b"ok \xc0\xaf overlong\n"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", llama_config(), seed=11)


def run_bytes(args, home, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmrun", *map(str, args)], input=data,
                          capture_output=True, env=cli_env(home), timeout=300)


@pytest.mark.parametrize("data", BAD_BYTES)
def test_run_decodes_bad_bytes_leniently_and_says_so_once(tiny, tmp_path, data):
    proc = run_bytes(["run", tiny, "--raw", "-t", "0", "-n", "2", "--json", "--dtype", "float32"], tmp_path,
                     data)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and stderr.count(NOTE) == 1
    assert json.loads(proc.stdout)["prompt_tokens"] > 0


def test_each_line_and_chat_read_bad_bytes_too(tiny, tmp_path):
    lines = run_bytes(["run", tiny, "--raw", "-t", "0", "-n", "2", "--each-line", "--dtype", "float32"],
                      tmp_path, b"".join(BAD_BYTES))
    assert lines.returncode == 0, lines.stderr.decode()
    assert lines.stderr.decode().count(NOTE) == 1
    rows = [json.loads(line) for line in lines.stdout.decode().splitlines()]
    assert len(rows) == len(BAD_BYTES) and "\ufffd" in rows[0]["prompt"]
    chat = run_bytes(["chat", tiny, "-t", "0", "-n", "2", "--dtype", "float32"], tmp_path, BAD_BYTES[0])
    assert chat.returncode == 0, chat.stderr.decode()
    assert "Traceback" not in chat.stderr.decode() and NOTE in chat.stderr.decode()


def test_valid_utf8_gets_no_note(tiny, tmp_path):
    proc = run_bytes(["run", tiny, "--raw", "-t", "0", "-n", "2", "--dtype", "float32"], tmp_path,
                     "café ✓ 日本\n".encode())
    assert proc.returncode == 0 and NOTE not in proc.stderr.decode()
