"""Import never loses a stored model: a different model of the same name needs --force, the same file
is reused, and .gguf paths given to run/chat get names that cannot collide."""

import shutil

import pytest

from llmrun.errors import StoreConflictError
from llmrun.hub import gguf_entries, gguf_import, store
from llmrun.hub.resolve import resolve_model
from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli
from tests.hub.gguf_files import write_tiny_gguf


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("other") / "other", llama_config(), seed=11)


@pytest.fixture()
def two_ggufs(tmp_path, tiny_checkpoint, other_checkpoint):
    """Two different models, both called tiny.gguf, in two folders."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return (write_tiny_gguf(tiny_checkpoint, tmp_path / "a" / "tiny.gguf"),
            write_tiny_gguf(other_checkpoint, tmp_path / "b" / "tiny.gguf"))


def forbid_conversion(monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_import, "_convert", no_conversion)


def test_a_different_model_is_not_replaced_without_force(two_ggufs):
    first, second = two_ggufs
    kept = gguf_import.import_gguf(first, "model")
    kept_sha = store.read_metadata(kept.path).sha256
    with pytest.raises(StoreConflictError) as caught:
        gguf_import.import_gguf(second, "model")
    message = str(caught.value)
    assert message.startswith("the store already has a different model called 'model' (imported from ")
    assert "--force" in message and "--name" in message and "\n" not in message
    assert store.read_metadata(kept.path).sha256 == kept_sha  # untouched
    replaced = gguf_import.import_gguf(second, "model", force=True)
    assert store.read_metadata(replaced.path).sha256 == gguf_entries.file_sha256(second)


def test_an_entry_not_made_by_import_is_not_replaced_either(two_ggufs, store_entry):
    folder = store_entry("mine")
    with pytest.raises(StoreConflictError, match="different model called 'mine'; pass --force"):
        gguf_import.import_gguf(two_ggufs[0], "mine")
    assert store.find_entry("mine") == folder and store.read_metadata(folder) is None


def test_the_same_file_is_reused_even_from_another_path(two_ggufs, tmp_path, monkeypatch, capsys):
    first, _ = two_ggufs
    imported = gguf_import.import_gguf(first, "model")
    forbid_conversion(monkeypatch)
    assert gguf_import.import_gguf(first, "model") == imported
    copy = shutil.copy(first, tmp_path / "copy.gguf")  # same bytes, another path and mtime: sha256 decides
    assert gguf_import.import_gguf(copy, "model") == imported
    assert "the store entry 'model' already holds copy.gguf; nothing to import" in capsys.readouterr().err


def test_a_damaged_import_of_the_same_file_is_repaired(two_ggufs):
    first, _ = two_ggufs
    imported = gguf_import.import_gguf(first, "model")
    (imported.path / "model.safetensors").unlink()
    repaired = gguf_import.import_gguf(first, "model")
    assert (repaired.path / "model.safetensors").is_file()


def test_gguf_paths_of_the_same_name_do_not_replace_each_other(two_ggufs, monkeypatch):
    first, second = two_ggufs
    a, b = resolve_model(str(first)), resolve_model(str(second))
    assert a.name != b.name and a.name.startswith("tiny-") and b.name.startswith("tiny-")
    forbid_conversion(monkeypatch)
    assert resolve_model(str(first)) == a and resolve_model(str(second)) == b
    assert sorted(p.name for p in store.list_entries()) == sorted([a.name, b.name])


def test_import_conflict_through_the_cli(two_ggufs, tmp_path):
    first, second = two_ggufs
    assert run_cli(["import", first, "--name", "model"], tmp_path).returncode == 0
    again = run_cli(["import", first, "--name", "model"], tmp_path)
    assert again.returncode == 0 and "nothing to import" in again.stderr
    refused = run_cli(["import", second, "--name", "model"], tmp_path)
    assert_one_line_error(refused, "different model called 'model'")
    assert "pass --force to replace it" in refused.stderr
    forced = run_cli(["import", second, "--name", "model", "--force"], tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "replaced the store entry 'model'" in forced.stderr


def test_a_read_only_store_still_reuses_a_touched_file(two_ggufs, monkeypatch):
    first, _ = two_ggufs
    imported = resolve_model(str(first))
    first.touch()  # a new mtime: recording it is an optimisation, not a condition

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(store, "atomic_write_bytes", read_only)
    forbid_conversion(monkeypatch)
    assert resolve_model(str(first)) == imported


def test_models_rm_deletes_an_entry_and_its_offload_cache(tmp_path, tiny_checkpoint):
    from tests.hub.gguf_files import write_tiny_gguf as write

    gguf_file = write(tiny_checkpoint, tmp_path / "tiny.gguf")
    assert run_cli(["import", gguf_file, "--name", "tiny"], tmp_path).returncode == 0
    streamed = ["hi", "--raw", "-t", "0", "-n", "1", "-q", "--dtype", "bfloat16", "--ctx", "64",
                "--cpu-mem", "400KB", "--gpu-mem", "0"]
    assert run_cli(["run", "tiny", *streamed], tmp_path).returncode == 0
    home = tmp_path / "llmrun-home"
    assert len(list((home / "offload").iterdir())) == 1
    removed = run_cli(["models", "--rm", "tiny"], tmp_path)
    assert removed.returncode == 0 and removed.stderr.startswith("removed ")
    assert list((home / "models").iterdir()) == [] and list((home / "offload").iterdir()) == []
    assert_one_line_error(run_cli(["models", "--rm", "tiny"], tmp_path), "llmrun's store has no entry 'tiny'")
