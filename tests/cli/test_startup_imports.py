"""What each command imports (start-up time, issue 14): plan/models/--help and run --url load neither
torch nor transformers; run loads torch but not transformers; none loads pydantic (Typer 0.29 did, per option). Checked in a fresh interpreter, not timed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from llmrun.cli import main
sys.argv = ["llmrun", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("IMPORTED:" + ",".join(m for m in ("torch", "transformers", "pydantic") if m in sys.modules), file=sys.stderr)
"""


def imported_after(args, home: Path) -> set[str]:
    env = dict(os.environ, LLMRUN_HOME=str(home), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env,
                          timeout=600, stdin=subprocess.DEVNULL)
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("IMPORTED:"), proc.stderr
    return set(filter(None, line.removeprefix("IMPORTED:").split(",")))


@pytest.mark.parametrize("args", [["--help"], ["models"], ["plan", "smollm2"], ["run", "--help"]])
def test_light_commands_import_neither_torch_nor_transformers_nor_pydantic(smollm2_home, args):
    assert imported_after(args, smollm2_home) == set()


def test_run_through_a_server_imports_neither_torch_nor_transformers(smollm2_home):
    """`run --url` only sends a request (here to a port nobody listens on: a one-line error)."""
    assert imported_after(["run", "smollm2", "hi", "--url", "http://127.0.0.1:9"], smollm2_home) == set()


def test_run_imports_torch_but_not_transformers_nor_pydantic(smollm2_home):
    assert imported_after(["run", "smollm2", "hi", "-t", "0", "-n", "2"], smollm2_home) == {"torch"}
