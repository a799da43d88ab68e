"""validate_model_folder's one-line errors and reading the Hugging Face cache layout."""

import json
from pathlib import Path

import pytest

from llmrun.errors import InvalidModelError
from llmrun.hub import hf_cache
from llmrun.hub.source import validate_model_folder
from tests.hub.layouts import commit_hash


def test_complete_folder_passes(model_folder):
    validate_model_folder(model_folder)


def test_missing_config(model_folder):
    (model_folder / "config.json").unlink()
    with pytest.raises(InvalidModelError, match=r"has no config.json$"):
        validate_model_folder(model_folder)


def test_unparseable_config(model_folder):
    (model_folder / "config.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match=r"^cannot read .*config.json"):
        validate_model_folder(model_folder)


def test_pytorch_bin_only_says_safetensors_only(model_folder):
    (model_folder / "model.safetensors").rename(model_folder / "pytorch_model.bin")
    with pytest.raises(InvalidModelError, match=r"has only \.bin weights; llmrun reads safetensors only"):
        validate_model_folder(model_folder)


def test_no_weights_at_all(model_folder):
    (model_folder / "model.safetensors").unlink()
    with pytest.raises(InvalidModelError, match=r"has no \*\.safetensors weights"):
        validate_model_folder(model_folder)


def test_missing_shard_listed_in_index(model_folder):
    (model_folder / "model.safetensors").rename(model_folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (model_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidModelError, match=r"missing weight shards .*: model-00002-of-00002"):
        validate_model_folder(model_folder)


def test_missing_tokenizer(model_folder):
    (model_folder / "tokenizer.json").unlink()
    with pytest.raises(InvalidModelError, match=r"has no tokenizer"):
        validate_model_folder(model_folder)


def test_vocab_and_merges_count_as_a_tokenizer(model_folder):
    (model_folder / "tokenizer.json").unlink()
    (model_folder / "vocab.json").write_text("{}")
    (model_folder / "merges.txt").write_text("")
    validate_model_folder(model_folder)


def test_a_file_is_not_a_model_folder(model_folder):
    with pytest.raises(InvalidModelError, match=r"is not a model folder"):
        validate_model_folder(model_folder / "config.json")


def test_cache_dir_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache.hub_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hf_cache.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hf_cache.hub_cache_dir() == Path.home() / ".cache" / "huggingface" / "hub"


@pytest.mark.parametrize("newline", [False, True])
def test_snapshot_found_through_refs_main(cached_repo, newline):
    snapshot = cached_repo("HuggingFaceTB/SmolLM2-135M-Instruct", ref_newline=newline)
    assert hf_cache.find_cached_snapshot("HuggingFaceTB/SmolLM2-135M-Instruct") == snapshot


def test_snapshot_without_config_is_not_found(cached_repo):
    cached_repo("org/partial", skip=("config.json",))
    assert hf_cache.find_cached_snapshot("org/partial") is None


def test_refs_main_names_the_snapshot_used(cached_repo):
    old = cached_repo("org/model", commit=commit_hash("old"))
    cached_repo("org/model", commit=commit_hash("new"), skip=("config.json",))
    # refs/main now names the incomplete "new" snapshot: transformers would use it, so nothing is found.
    assert hf_cache.find_cached_snapshot("org/model") is None
    (old.parent.parent / "refs" / "main").write_text(commit_hash("old"))
    assert hf_cache.find_cached_snapshot("org/model") == old


@pytest.mark.parametrize("ref", ["", "main", "../../../etc", "0" * 39])
def test_malformed_ref_is_ignored(cached_repo, ref):
    snapshot = cached_repo("org/model")
    (snapshot.parent.parent / "refs" / "main").write_text(ref)
    assert hf_cache.find_cached_snapshot("org/model") is None


def test_list_cached_repos_skips_incomplete_and_non_models(cached_repo, hub_env):
    cached_repo("org/complete")
    cached_repo("org/incomplete", skip=("model.safetensors",))
    cached_repo("org/no-ref", write_ref=False)
    (hub_env["cache"] / "datasets--org--data" / "snapshots").mkdir(parents=True)
    assert [repo.repo_id for repo in hf_cache.list_cached_repos()] == ["org/complete"]


def test_list_cached_repos_without_a_cache_folder():
    assert hf_cache.list_cached_repos() == []


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("ON", True), ("true", True), ("0", False), ("", False),
])
def test_offline_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hf_cache.is_offline() is expected


@pytest.mark.parametrize("name, expected", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("Qwen/Qwen2.5-0.5B-Instruct", True),
    ("smollm2", False), ("a/b/c", False), ("../x", False), ("org/..", False), ("/abs", False),
])
def test_repo_id_shape(name, expected):
    assert hf_cache.is_repo_id(name) is expected
