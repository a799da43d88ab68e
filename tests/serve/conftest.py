"""A tiny random checkpoint with a chat template and a 2,048-token context, and one shared server
over it (for the tests that do not need a server of their own)."""

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.serve.remote import RemoteServer


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory):
    """Seed 1 (printable greedy text, as the chat tests use); room for long replies."""
    config = llama_config(max_position_embeddings=2048)
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-serve", config, seed=1)


@pytest.fixture(scope="session")
def server(serve_model, tmp_path_factory):
    """float32 (exact whatever the company), 16 sequences at once, room to wait for 256."""
    remote = RemoteServer(serve_model, tmp_path_factory.mktemp("serve-home"), "--dtype", "float32",
                          "--batch", "16", "--max-waiting", "256")
    try:
        yield remote.wait_ready()
    finally:
        remote.stop()
