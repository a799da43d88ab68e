"""GGUF import: a tiny F32 GGUF converts into a store entry that transformers loads with the same logits."""

import json

import pytest
import torch

from llmrun.errors import InvalidModelError
from llmrun.hub import gguf_entries, gguf_import, store
from llmrun.hub.resolve import resolve_model
from llmrun.hub.source import validate_model_folder
from tests.checkpoints import CHAT_TEMPLATE, llama_config, save_checkpoint
from tests.hub.gguf_files import write_tiny_gguf, write_unknown_architecture_gguf


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tied") / "tied-llama"
    return save_checkpoint(folder, llama_config(tie_word_embeddings=True), seed=5)


@pytest.fixture()
def tiny_gguf(tmp_path, tiny_checkpoint):
    return write_tiny_gguf(tiny_checkpoint, tmp_path / "Tiny-Llama.F32.gguf")


def _logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("checkpoint_fixture", ["tiny_checkpoint", "tied_checkpoint"])
def test_import_reproduces_the_original_model(request, tmp_path, checkpoint_fixture):
    from transformers import AutoTokenizer

    original = request.getfixturevalue(checkpoint_fixture)
    source = gguf_import.import_gguf(write_tiny_gguf(original, tmp_path / "m.gguf"), "tiny")
    assert (source.name, source.source) == ("tiny", "store")
    validate_model_folder(source.path)
    config = json.loads((source.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    ids = tokenizer("The capital of France is Paris.")["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(original)("The capital of France is Paris.")["input_ids"]
    torch.testing.assert_close(_logits(source.path, ids), _logits(original, ids))
    generation = json.loads((source.path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_tied_import_stores_the_embedding_once(tmp_path, tied_checkpoint):
    from safetensors import safe_open

    source = gguf_import.import_gguf(write_tiny_gguf(tied_checkpoint, tmp_path / "t.gguf"))
    assert source.name == "t"
    with safe_open(str(source.path / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_metadata_records_the_original_file(tiny_gguf):
    source = gguf_import.import_gguf(tiny_gguf)
    metadata = store.read_metadata(source.path)
    assert source.name == "Tiny-Llama.F32"
    assert metadata.source == "gguf-import"
    assert metadata.original_file == str(tiny_gguf)
    assert metadata.sha256 == gguf_entries.file_sha256(tiny_gguf)


def test_resolving_a_gguf_path_imports_once(tiny_gguf, monkeypatch):
    first = resolve_model(str(tiny_gguf))
    assert (first.name, first.source) == (gguf_entries.path_entry_name(tiny_gguf), "store")
    assert first.name.startswith("Tiny-Llama.F32-")

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_import, "_convert", no_conversion)
    assert resolve_model(str(tiny_gguf)) == first
    tiny_gguf.touch()  # a new mtime: the sha256 decides, and it has not changed
    assert resolve_model(str(tiny_gguf)) == first
    assert store.read_metadata(first.path).original_mtime_ns == tiny_gguf.stat().st_mtime_ns

    def no_hashing(path):
        raise AssertionError("hashed again")

    monkeypatch.setattr(gguf_entries, "file_sha256", no_hashing)
    assert resolve_model(str(tiny_gguf)) == first  # the new mtime was recorded: no second hash
    assert resolve_model(first.name) == first  # now a store entry by name


def test_changed_gguf_is_imported_again(tmp_path, tiny_checkpoint, tied_checkpoint, capsys):
    path = write_tiny_gguf(tiny_checkpoint, tmp_path / "m.gguf")
    first_sha = store.read_metadata(resolve_model(str(path)).path).sha256
    write_tiny_gguf(tied_checkpoint, path)
    source = resolve_model(str(path))
    assert store.read_metadata(source.path).sha256 != first_sha
    assert f"replaced the store entry '{source.name}'" in capsys.readouterr().err
    assert [p.name for p in source.path.parent.iterdir()] == [source.name]


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(InvalidModelError, match=r"fake.gguf is not a GGUF file"):
        gguf_import.import_gguf(fake)
    with pytest.raises(InvalidModelError, match=r"fake.gguf is not a GGUF file"):
        resolve_model(str(fake))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(InvalidModelError, match=r"^no such file: .*absent.gguf$"):
        gguf_import.import_gguf(tmp_path / "absent.gguf")


def test_truncated_gguf_is_one_line_error_and_leaves_no_entry(tiny_gguf, hub_env):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: len(data) // 3])
    with pytest.raises(InvalidModelError, match=r"^cannot convert Tiny-Llama.F32.gguf: ") as caught:
        gguf_import.import_gguf(tiny_gguf)
    assert "\n" not in str(caught.value)
    assert list(hub_env["store"].iterdir()) == []


def test_import_is_quiet_off_a_tty(tiny_gguf, capfd):
    gguf_import.import_gguf(tiny_gguf)
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "it/s" not in captured.err and "Converting" not in captured.err


def test_unsupported_architecture_is_named(tmp_path):
    write_unknown_architecture_gguf(tmp_path / "odd.gguf")
    with pytest.raises(InvalidModelError) as caught:
        gguf_import.import_gguf(tmp_path / "odd.gguf")
    assert str(caught.value) == (
        "cannot convert odd.gguf: GGUF model with architecture fancyarch is not supported yet.")
