"""The process ends at once when a command is done (streams.exit_now): status, flushed output and exit
handlers as at a normal exit, without the interpreter's teardown of every module (start-up, issue 14)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import atexit, sys, threading, time
from llmrun.streams import exit_now

class Teardown:
    def __del__(self):
        sys.stderr.write("torn down\\n")

kept = Teardown()  # a module global: finalized only by the interpreter's teardown
atexit.register(lambda: open(sys.argv[2], "w").write("exit handler ran"))
sys.stdout.write("buffered, no newline")
mode = sys.argv[1]
if mode == "thread":
    threading.Thread(target=lambda: (time.sleep(0.5), open(sys.argv[2] + ".thread", "w").write("done"))).start()
code = {"int": 3, "none": None, "text": "a message", "thread": 0}[mode]
exit_now(code)
"""


def run(mode: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path / "marker")], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("mode, status", [("int", 3), ("none", 0), ("text", 1)])
def test_the_status_output_and_exit_handlers_survive_but_the_teardown_is_skipped(tmp_path, mode, status):
    proc = run(mode, tmp_path)
    assert proc.returncode == status
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "marker").read_text() == "exit handler ran"
    assert "torn down" not in proc.stderr
    assert ("a message" in proc.stderr) == (mode == "text")


def test_a_running_non_daemon_thread_gets_the_normal_exit_that_waits_for_it(tmp_path):
    proc = run("thread", tmp_path)
    assert proc.returncode == 0
    assert (tmp_path / "marker.thread").read_text() == "done"
    assert (tmp_path / "marker").read_text() == "exit handler ran"


MODULE_RUN = """
import runpy, sys

class Teardown:
    def __del__(self):
        sys.stderr.write("torn down\\n")

kept = Teardown()
sys.argv = ["llmrun", "--version"]
runpy.run_module("llmrun", run_name="__main__")
"""


def test_python_m_llmrun_and_the_console_script_end_through_it():
    proc = subprocess.run([sys.executable, "-c", MODULE_RUN], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip()
    assert "torn down" not in proc.stderr
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["llmrun"] == "llmrun.launch:entry"
