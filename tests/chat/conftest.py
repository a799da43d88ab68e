"""Chat fixtures: a tiny random checkpoint (with a chat template) and engines built from it."""

import pytest

from tests.checkpoints import llama_config, save_checkpoint


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """Seed 1: its greedy replies are printable text that tokenizes back to the same ids."""
    return save_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-chat", llama_config(), seed=1)


@pytest.fixture(scope="module")
def tiny_engine(tiny_chat_model):
    from llmrun.engine.build import EngineOptions, build_engine

    return build_engine(tiny_chat_model, EngineOptions(dtype="float32", gpu_mem_bytes=0))
