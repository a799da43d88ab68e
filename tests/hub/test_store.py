"""llmrun's store: safe names, atomic replacement, temporary folders that never show."""

import os
import time

import pytest

from llmrun.errors import InvalidModelError, ModelNotFoundError, UsageError
from llmrun.hub import store
from llmrun.hub.resolve import resolve_model
from llmrun.hub.source import validate_model_folder


@pytest.mark.parametrize("name, expected", [
    ("smollm2", "smollm2"),
    ("SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct.Q4_1"),
    ("my model (v2)", "my-model-v2"),
])
def test_store_name_sanitizes(name, expected):
    assert store.store_name(name) == expected


@pytest.mark.parametrize("name", ["a/b", "..", "x/../y", "a\\b", "", "...", ".hidden", "///"])
def test_store_name_refuses_paths_and_empty_names(name):
    with pytest.raises(UsageError, match="invalid model name"):
        store.store_name(name)


def test_staged_entry_appears_only_when_complete(hub_env, tiny_checkpoint):
    with store.staged_entry("fresh") as staging:
        assert staging.name.startswith(".tmp-fresh-")
        assert not (hub_env["store"] / "fresh").exists()
        for file in tiny_checkpoint.iterdir():
            (staging / file.name).write_bytes(file.read_bytes())
    validate_model_folder(hub_env["store"] / "fresh")
    assert [p.name for p in hub_env["store"].iterdir()] == ["fresh"]


def test_failed_staging_keeps_the_old_entry(hub_env, store_entry):
    old = store_entry("model")
    before = sorted(p.name for p in old.iterdir())
    with pytest.raises(RuntimeError, match="conversion failed"):
        with store.staged_entry("model") as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("conversion failed")
    assert sorted(p.name for p in old.iterdir()) == before
    assert [p.name for p in hub_env["store"].iterdir()] == ["model"]


def test_staging_replaces_an_existing_entry(hub_env, store_entry, tiny_checkpoint):
    store_entry("model")
    with store.staged_entry("model") as staging:
        for file in tiny_checkpoint.iterdir():
            (staging / file.name).write_bytes(file.read_bytes())
        (staging / "marker").write_text("new")
    assert (hub_env["store"] / "model" / "marker").read_text() == "new"
    assert [p.name for p in hub_env["store"].iterdir()] == ["model"]


def test_leftover_temp_folder_is_neither_listed_nor_resolved(hub_env, tiny_checkpoint, store_entry):
    store_entry(".tmp-ghost-1234abcd")  # a complete-looking copy left by a killed import
    assert store.list_entries() == []
    assert store.find_entry(".tmp-ghost-1234abcd") is None
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        resolve_model(".tmp-ghost-1234abcd")


def test_stale_temp_folders_are_cleaned_young_ones_kept(hub_env):
    stale = hub_env["store"] / ".tmp-old-00000000"
    young = hub_env["store"] / ".tmp-running-11111111"
    stale.mkdir(parents=True)
    young.mkdir()
    long_ago = time.time() - store.STALE_TEMP_SECONDS - 60
    os.utime(stale, (long_ago, long_ago))
    store.clean_stale_temp_folders()
    assert not stale.exists()
    assert young.exists()


def test_damaged_entry_is_reported_not_skipped(store_entry):
    folder = store_entry("broken")
    (folder / "model.safetensors").unlink()
    with pytest.raises(InvalidModelError, match=r"store entry 'broken' is damaged .*import it again"):
        store.find_entry("broken")
    assert store.list_entries() == []


def test_metadata_round_trip(store_entry):
    folder = store_entry("m")
    metadata = store.StoreMetadata(source="gguf-import", original_file="/x/m.gguf", sha256="ab" * 32,
                                   created="2026-01-01T00:00:00+00:00", original_size_bytes=5)
    store.write_metadata(folder, metadata)
    assert store.read_metadata(folder) == metadata
    (folder / store.METADATA_FILE).write_text("[]")
    assert store.read_metadata(folder) is None
