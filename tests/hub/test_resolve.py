"""resolve_model: local path > store > alias > HF cache (never a download), its one-line errors; the run path pulls."""

import os
import shutil

import pytest

from llmrun.errors import InvalidModelError, ModelNotDownloadedError, ModelNotFoundError, ModelUnavailableError
from llmrun.hub import pull
from llmrun.hub.resolve import resolve_model
from llmrun.hub.source import ModelSource

SMOL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_local_folder(model_folder):
    source = resolve_model(str(model_folder))
    assert source == ModelSource(name="model", path=model_folder.resolve(), source="local")


def test_local_folder_beats_store_entry_of_the_same_name(model_folder, store_entry, monkeypatch):
    store_entry("model")
    monkeypatch.chdir(model_folder.parent)
    assert resolve_model("model").source == "local"


def test_store_entry_beats_alias_and_cache(store_entry, cached_repo):
    folder = store_entry("smollm2")
    cached_repo(SMOL_REPO)
    assert resolve_model("smollm2") == ModelSource(name="smollm2", path=folder, source="store")


def test_alias_found_in_hf_cache(cached_repo):
    snapshot = cached_repo(SMOL_REPO)
    source = resolve_model("smollm2")
    assert source == ModelSource(name="smollm2", path=snapshot, source="hf-cache", repo_id=SMOL_REPO)


def test_alias_is_case_insensitive(cached_repo):
    cached_repo(SMOL_REPO)
    assert resolve_model("SmolLM2").name == "smollm2"


def test_repo_id_found_in_hf_cache(cached_repo):
    snapshot = cached_repo("org/tiny-llama", ref_newline=True)
    source = resolve_model("org/tiny-llama")
    assert (source.path, source.source, source.name, source.repo_id) == (
        snapshot, "hf-cache", "org/tiny-llama", "org/tiny-llama")


def test_incomplete_snapshot_is_not_resolved(cached_repo, monkeypatch):
    cached_repo(SMOL_REPO, skip=("config.json",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError):
        resolve_model("smollm2")


def test_offline_absent_alias_names_the_pull_command_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the autouse fixture fails the test on any Hub call
    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model("phi-3-mini")
    assert str(caught.value) == (
        "model 'phi-3-mini' is not available offline; run `llmrun pull phi-3-mini` when online")


def test_offline_absent_repo_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match=r"run `llmrun pull org/absent` when online"):
        resolve_model("org/absent")


def test_resolution_never_downloads(monkeypatch):
    monkeypatch.setattr(pull, "pull_model", lambda name: pytest.fail("resolution pulled"))
    with pytest.raises(ModelNotDownloadedError, match=r"not downloaded; run `llmrun pull smollm2`"):
        resolve_model("smollm2")


def test_absent_alias_is_pulled_when_online(monkeypatch, tmp_path):
    from llmrun.runtime import present_or_pulled

    pulled = ModelSource(name="qwen2.5-0.5b", path=tmp_path, source="download", repo_id="Qwen/x")
    calls = []
    monkeypatch.setattr(pull, "pull_model", lambda name: calls.append(name) or pulled)
    assert present_or_pulled("qwen2.5-0.5b") is pulled
    assert calls == ["qwen2.5-0.5b"]


def test_offline_absent_alias_is_not_pulled(monkeypatch):
    from llmrun.runtime import present_or_pulled

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pull, "pull_model", lambda name: pytest.fail("pulled offline"))
    with pytest.raises(ModelUnavailableError, match=r"not available offline; run `llmrun pull phi-3-mini`"):
        present_or_pulled("phi-3-mini")


def test_unknown_name_suggests_aliases():
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("phi3-mini")
    assert str(caught.value) == ("unknown model 'phi3-mini'; did you mean: phi-3-mini, phi-3.5-mini, "
                                 "phi-4-mini? Run `llmrun models` to list local models.")


def test_unknown_name_without_close_alias():
    with pytest.raises(ModelNotFoundError, match=r"^unknown model 'zzzz'; use an alias"):
        resolve_model("zzzz")


@pytest.mark.parametrize("name", ["./missing", "../nowhere/model", "/no/such/folder", "~/no-such-x",
                                  "missing.gguf"])
def test_path_like_names_that_do_not_exist(name):
    with pytest.raises(ModelNotFoundError, match=f"^no such file or folder: {name}$"):
        resolve_model(name)


def test_existing_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModelError, match=r"empty has no config.json$"):
        resolve_model(str(tmp_path / "empty"))


def test_existing_file_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidModelError, match=r"is a file, not a model folder or a .gguf file"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_a_stray_folder_named_like_an_alias_does_not_hide_it(tmp_path, cached_repo, monkeypatch):
    snapshot = cached_repo(SMOL_REPO)
    (tmp_path / "smollm2").mkdir()  # e.g. a project folder, not a model
    monkeypatch.chdir(tmp_path)
    assert resolve_model("smollm2").path == snapshot


def test_hf_home_is_honoured(tmp_path, monkeypatch, tiny_checkpoint):
    from tests.hub.layouts import add_cached_repo

    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snapshot = add_cached_repo(tmp_path / "hf-home" / "hub", "org/m", tiny_checkpoint)
    assert resolve_model("org/m").path == snapshot


def test_relative_symlinked_snapshot_files_resolve(cached_repo):
    snapshot = cached_repo("org/m")
    assert os.path.islink(snapshot / "config.json")
    shutil.rmtree(snapshot.parent.parent / "blobs")  # dangling links: the snapshot is incomplete
    with pytest.raises(ModelUnavailableError):
        resolve_model("org/m")
