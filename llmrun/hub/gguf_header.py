"""What a GGUF file becomes once imported (its config.json and tensor shapes), read from its header alone.

`llmrun plan FILE.gguf` promises to work before loading anything. gguf's reader takes ~10 s on a
small model's header (a numpy view per tokenizer string, ~100k of them), so the header is read here
with plain reads, skipping the tokenizer's long arrays, and copied without them (their length kept
as `{arch}.vocab_size`, tensors as names only) into a tiny GGUF for transformers to turn into a
config exactly as the import does; a model built from it on the meta device gives the names and
shapes the import will write (float32, a tied head left out, as gguf_import does).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from llmrun.errors import InvalidModelError
from llmrun.weights.index import CheckpointIndex, TensorInfo

IMPORTED_DTYPE = "F32"  # gguf_import dequantizes to float32
_FLOAT32_BYTES = 4
_LONG_ARRAY = 4096  # arrays longer than this (tokens, merges, scores) are skipped, not read
# GGUF value types: struct format of the scalars; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def imported_config_and_index(gguf_file: Path) -> tuple[dict, CheckpointIndex]:
    """(config.json as the import writes it, the index of its model.safetensors), without converting."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmrun.hub.gguf_import import quiet_transformers

    with quiet_transformers(), tempfile.TemporaryDirectory() as empty:
        try:
            light = _header_copy(gguf_file, Path(empty) / "header.gguf")
            config = AutoConfig.from_pretrained(empty, gguf_file=str(light))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError, NotImplementedError,
                struct.error) as err:
            lines = str(err).strip().splitlines()
            reason = lines[0] if lines else type(err).__name__
            raise InvalidModelError(f"cannot read {gguf_file.name}'s header: {reason}") from None
    return _config_dict(model), _meta_index(model, gguf_file)


def _config_dict(model) -> dict:
    """The config.json gguf_import._write_config writes, as a dict."""
    config = json.loads(model.config.to_json_string())
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    return config


def _meta_index(model, gguf_file: Path) -> CheckpointIndex:
    """Tensor names and shapes of the import's weights; byte ranges laid end to end (never read)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors, offset = {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * _FLOAT32_BYTES
        tensors[name] = TensorInfo(name, gguf_file, IMPORTED_DTYPE, tuple(tensor.shape), offset, offset + size)
        offset += size
    return CheckpointIndex(gguf_file.parent, tensors)


def _header_copy(gguf_file: Path, target: Path) -> Path:
    """A GGUF holding `gguf_file`'s metadata without its long arrays, and its tensors as 1-element stubs."""
    import gguf
    import numpy as np

    fields, skipped, tensor_names = _read_header(gguf_file)
    architecture = next(value for key, _, value, _ in fields if key == "general.architecture")
    writer = gguf.GGUFWriter(str(target), architecture)
    for key, value_type, value, item_type in fields:
        if key != "general.architecture":
            writer.add_key_value(key, value, gguf.GGUFValueType(value_type),
                                 sub_type=None if item_type is None else gguf.GGUFValueType(item_type))
    vocab_key = f"{architecture}.vocab_size"
    if "tokenizer.ggml.tokens" in skipped and all(key != vocab_key for key, *_ in fields):
        writer.add_key_value(vocab_key, skipped["tokenizer.ggml.tokens"], gguf.GGUFValueType.UINT32)
    for name in tensor_names:
        writer.add_tensor(name, np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _read_header(gguf_file: Path) -> tuple[list[tuple[str, int, Any, Any]], dict[str, int], list[str]]:
    """(key, type, value, array item type) of each metadata entry, {key: length} of the skipped
    long arrays, and the tensor names; ValueError for a file that is not a GGUF v2/v3."""
    with open(gguf_file, "rb") as handle:
        magic, version = handle.read(4), _unpack(handle, "<I")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (version {version})")
        num_tensors, num_fields = _unpack(handle, "<Q"), _unpack(handle, "<Q")
        fields, skipped = [], {}
        for _ in range(num_fields):
            key, value_type = _read_string(handle), _unpack(handle, "<I")
            if value_type != _ARRAY:
                fields.append((key, value_type, _read_value(handle, value_type), None))
                continue
            item_type, count = _unpack(handle, "<I"), _unpack(handle, "<Q")
            if count > _LONG_ARRAY:
                _skip_array(handle, item_type, count)
                skipped[key] = count
            else:
                fields.append((key, value_type, [_read_value(handle, item_type) for _ in range(count)], item_type))
        tensor_names = []
        for _ in range(num_tensors):
            tensor_names.append(_read_string(handle))
            num_dims = _unpack(handle, "<I")
            handle.seek(8 * num_dims + 4 + 8, 1)  # dims, ggml type, data offset
    return fields, skipped, tensor_names


def _read_value(handle: BinaryIO, value_type: int) -> Any:
    if value_type == _STRING:
        return _read_string(handle)
    if value_type not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {value_type}")
    return _unpack(handle, _SCALARS[value_type])


def _skip_array(handle: BinaryIO, item_type: int, count: int) -> None:
    if item_type == _STRING:
        for _ in range(count):
            handle.seek(_unpack(handle, "<Q"), 1)
    elif item_type in _SCALARS:
        handle.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
    else:
        raise ValueError(f"unsupported GGUF array item type {item_type}")


def _read_string(handle: BinaryIO) -> str:
    return handle.read(_unpack(handle, "<Q")).decode("utf-8", errors="replace")


def _unpack(handle: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("the header ends early (a truncated file)")
    return struct.unpack(fmt, data)[0]
