"""A reader that goes away early (`| true`, `| head -c 0`): every command ends quietly with status 0."""

import os
import subprocess
import sys

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import cli_env, run_cli
from tests.hub.gguf_files import write_tiny_gguf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint, the same as a GGUF file, and a home whose store holds it as `tiny`."""
    base = tmp_path_factory.mktemp("pipe")
    tiny = save_checkpoint(base / "tiny", llama_config(), seed=4)
    gguf = write_tiny_gguf(tiny, base / "Tiny.F32.gguf")
    imported = run_cli(["import", gguf, "--name", "tiny"], base)
    assert imported.returncode == 0, imported.stderr
    return {"TINY": str(tiny), "GGUF": str(gguf), "home": base}


def into_closed_pipe(args, home, stdin, *, buffered: bool, stderr_too: bool):
    """Run llmrun with stdout (and stderr, if asked) on a pipe whose reader is already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = cli_env(home)
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:  # every write reaches the pipe at once, inside the command
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "llmrun", *args], stdin=subprocess.PIPE, stdout=write_end,
                            stderr=write_end if stderr_too else subprocess.PIPE, env=env)
    os.close(write_end)
    _, stderr = proc.communicate(stdin.encode(), timeout=300)
    return proc.returncode, (stderr or b"").decode()


COMMANDS = {
    "help": (["--help"], ""),
    "command-help": (["run", "--help"], ""),
    "version": (["--version"], ""),
    "plan": (["plan", "TINY"], ""),
    "plan-json": (["plan", "TINY", "--json"], ""),
    "models": (["models"], ""),
    "models-json": (["models", "--json"], ""),
    "bench-json": (["bench", "TINY", "--quick", "--json", "--reps", "1", "--batch", "2"], ""),
    "pull": (["pull", "tiny"], ""),
    "import": (["import", "GGUF", "--name", "again"], ""),
    "chat-piped": (["chat", "TINY", "-n", "3"], "Hello\nand you?\n"),
    "run": (["run", "TINY", "Hello", "--raw", "-n", "3"], ""),
    "run-json": (["run", "TINY", "Hello", "--raw", "-n", "3", "--json"], ""),
    "run-each-line": (["run", "TINY", "--each-line", "--raw", "-n", "3"], "one\ntwo\n"),
}


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_closed_stdout_ends_quietly_with_status_0(files, name, buffered):
    args, stdin = COMMANDS[name]
    args = [files.get(arg, arg) for arg in args]
    if name == "import":
        args[-1] = f"again-{buffered}"
    status, stderr = into_closed_pipe(args, files["home"], stdin, buffered=buffered, stderr_too=False)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "Broken pipe" not in stderr, stderr
    assert status == 0, stderr


@pytest.mark.parametrize("name", ["pull", "import", "run"])
def test_closed_stdout_and_stderr_end_with_status_0(files, name):
    args, stdin = COMMANDS[name]
    args = [files.get(arg, arg) for arg in args]
    if name == "import":
        args[-1] = "again-both"
    status, _ = into_closed_pipe(args, files["home"], stdin, buffered=True, stderr_too=True)
    assert status == 0
