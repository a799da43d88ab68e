"""Fixtures for llmrun.hub: an isolated LLMRUN_HOME and HF cache, no network, tiny checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.hub.layouts import add_cached_repo


class NetworkUsed(AssertionError):
    """A test reached for the Hugging Face Hub or pip without asking for it."""


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """LLMRUN_HOME and HF_HUB_CACHE inside tmp_path, online mode, and every network entry point
    replaced by one that fails the test: tests that want a Hub install their own fakes."""
    home = tmp_path / "llmrun-home"
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("LLMRUN_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for variable in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise NetworkUsed(f"network call with {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr("llmrun.hub.pypi._run_pip", no_network)
    return {"home": home, "store": home / "models", "cache": cache}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One tiny random Llama (config, safetensors, tokenizer), built once; copy it, never edit it."""
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", llama_config(), seed=3)


@pytest.fixture()
def model_folder(tmp_path, tiny_checkpoint) -> Path:
    """A private copy of the tiny checkpoint that a test may change."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))


@pytest.fixture()
def store_entry(hub_env, tiny_checkpoint):
    """Put a copy of the tiny checkpoint into llmrun's store under a name; returns its folder."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(tiny_checkpoint, hub_env["store"] / name))

    return make


@pytest.fixture()
def cached_repo(hub_env, tiny_checkpoint):
    """Put a copy of the tiny checkpoint into the HF cache as `repo_id`; returns the snapshot folder."""

    def make(repo_id: str, **options) -> Path:
        return add_cached_repo(hub_env["cache"], repo_id, tiny_checkpoint, **options)

    return make
