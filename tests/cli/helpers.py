"""Running the real CLI in a subprocess with an isolated LLMRUN_HOME and HF cache."""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path


def cli_env(home: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(
        LLMRUN_HOME=str(home / "llmrun-home"),
        HF_HUB_CACHE=str(home / "hf-cache"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(args, home: Path, stdin: str | None = None, **extra) -> subprocess.CompletedProcess:
    """`python -m llmrun ARGS`; stdin is a pipe (empty unless given), never a TTY."""
    return subprocess.run(
        [sys.executable, "-m", "llmrun", *map(str, args)],
        input=stdin if stdin is not None else "",
        capture_output=True, text=True, env=cli_env(home, **extra), timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0], lines[0]
    assert proc.stdout == ""


def limited_file_size(num_bytes: int):
    """A preexec_fn: files cannot grow past `num_bytes` (RLIMIT_FSIZE), as on a full disk."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, num_bytes))

    return apply


def run_limited(args, home: Path, num_bytes: int) -> subprocess.CompletedProcess:
    """The CLI in a subprocess that cannot write a file past `num_bytes`: a disk full mid-write."""
    return subprocess.run([sys.executable, "-m", "llmrun", *map(str, args)], input="", capture_output=True,
                          text=True, env=cli_env(home, LLMRUN_NO_NATIVE=1), timeout=300,
                          preexec_fn=limited_file_size(num_bytes))


def assert_usage_error(proc: subprocess.CompletedProcess, fragment: str, *, hint: bool = True) -> None:
    """Typer's report of a usage error: exit 2, the usage, a hint, one `Error:` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    if hint:  # the usage, the hint, one error line
        assert lines[0].startswith("Usage: llmrun"), proc.stderr
        assert lines[1].startswith("Try 'llmrun") and len(lines) == 3, proc.stderr
    else:  # a value missing at the end of the line: Typer says so without the usage
        assert len(lines) == 1, proc.stderr
