import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from llmrun.errors import InvalidModelError
from llmrun.weights.index import build_index
from llmrun.weights.loader import TensorFileReader, pack_layout


def test_index_reads_headers_and_loader_reads_exact_tensors(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    index = build_index(tmp_path)
    assert index["a"].shape == (2, 3) and index["a"].dtype == "F32" and index["a"].num_bytes == 24
    assert index["b"].dtype == "BF16"
    assert index.num_parameters == 10
    (a,), (b,) = pack_layout(index, {"a": ("a",)}), pack_layout(index, {"b": ("b",)})
    with TensorFileReader() as reader:
        assert torch.equal(reader.load_packed(a, torch.float32), tensors["a"])
        assert torch.equal(reader.load_packed(b, torch.float32), torch.ones(4))


def test_a_mapped_tensor_is_the_stored_bytes_and_a_truncated_file_is_one_error(tmp_path):
    """`mapped` (packing reads weights stored as they run through a mapping): the same values as a
    read, a private copy-on-write view (writing it changes nothing on disk), and a file cut short
    after its header was read is the loader's usual error, not a crash."""
    tensors = {"w": torch.randn(5, 8).to(torch.bfloat16), "x": torch.randn(3, 8).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    index = build_index(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with TensorFileReader() as reader:
        for name, tensor in tensors.items():
            view = reader.mapped(index[name])
            assert view.shape == tensor.shape and view.dtype == torch.bfloat16 and torch.equal(view, tensor)
        view.fill_(0)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    with open(tmp_path / "model.safetensors", "r+b") as handle:
        handle.truncate(index["x"].end - 4)
    with TensorFileReader() as reader, pytest.raises(InvalidModelError, match="truncated"):
        reader.mapped(index["x"])


def test_packed_tensors_concatenate_parts_and_convert_in_chunks(tmp_path, monkeypatch):
    import llmrun.weights.loader as loader

    q, k = torch.randn(6, 4), torch.randn(2, 4)
    save_file({"q": q, "k": k}, tmp_path / "model.safetensors")
    (packed,) = pack_layout(build_index(tmp_path), {"qk": ("q", "k")})
    assert packed.shape == (8, 4)
    monkeypatch.setattr(loader, "SCRATCH_BYTES", 12)  # three fp32 values per conversion chunk
    with TensorFileReader() as reader:
        out = reader.load_packed(packed, torch.bfloat16)
    assert torch.equal(out, torch.cat((q, k)).to(torch.bfloat16))
    with pytest.raises(InvalidModelError, match="lacks tensor v"):
        pack_layout(build_index(tmp_path), {"qkv": ("q", "k", "v")})


def test_sharded_checkpoint_uses_the_shard_index(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"y": torch.ones(3)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    index = build_index(tmp_path)
    assert set(index.tensors) == {"x", "y"}
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InvalidModelError, match="missing weight shards: model-00002-of-00002"):
        build_index(tmp_path)


def test_truncated_file_is_named(tmp_path):
    save_file({"w": torch.zeros(1000)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(InvalidModelError, match=r"model\.safetensors is truncated"):
        build_index(tmp_path)


@pytest.mark.parametrize("payload", [b"\x00\x01", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 4) + b"nope"])
def test_corrupt_header_is_named(tmp_path, payload):
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(InvalidModelError, match=r"model\.safetensors is (corrupt|truncated)"):
        build_index(tmp_path)


def test_folder_without_weights(tmp_path):
    with pytest.raises(InvalidModelError, match="no .safetensors weights"):
        build_index(tmp_path)
