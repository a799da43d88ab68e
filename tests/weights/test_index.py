import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from llmrun.errors import InvalidModelError
from llmrun.weights.index import build_index
from llmrun.weights.loader import WeightReader


def test_index_reads_headers_and_loader_reads_exact_tensors(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    index = build_index(tmp_path)
    assert index["a"].shape == (2, 3) and index["a"].dtype == "F32" and index["a"].num_bytes == 24
    assert index["b"].dtype == "BF16"
    assert index.num_parameters == 10
    with WeightReader(index) as reader:
        assert torch.equal(reader.load("a"), tensors["a"])
        assert reader.load("b", dtype=torch.float32).dtype == torch.float32


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
