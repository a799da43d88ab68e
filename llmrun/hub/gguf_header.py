"""What a GGUF file becomes once imported (its config.json and tensor shapes), read from its header alone.

`llmrun plan FILE.gguf` promises to work before loading anything. gguf's reader takes ~10 s on a
small model's header (a numpy view per tokenizer string, ~100k of them), so the header is read here
with plain reads, skipping the tokenizer's long arrays, and copied without them (their length kept
as `{arch}.vocab_size`, tensors as names only) into a tiny GGUF for transformers to turn into a
config exactly as the import does; a model built from it on the meta device gives the names and
shapes the import will write (float32, a tied head left out, as gguf_import does). The tensors'
names, shapes, GGML types and byte ranges (`tensor_layout`) come from the same plain reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from llmrun.errors import InvalidModelError
from llmrun.weights.index import CheckpointIndex, TensorInfo

IMPORTED_DTYPE = "F32"  # gguf_import dequantizes to float32
_FLOAT32_BYTES = 4
_LONG_ARRAY = 4096  # arrays longer than this (tokens, merges, scores) are skipped, not read
# GGUF value types: struct format of the scalars; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_DEFAULT_ALIGNMENT = 32  # GGUF's data alignment when general.alignment is absent


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF file as its header describes it."""

    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the innermost (a row's length)
    ggml_type: int  # a GGMLQuantizationType value, possibly one this gguf package does not know
    start: int  # absolute byte offset of its data in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy / torch order: [rows, ..., row length]."""
        return tuple(reversed(self.dims))


def tensor_layout(gguf_file: Path) -> list[GgufTensor]:
    """Every tensor's name, dims, GGML type and absolute data offset; ValueError for a broken header."""
    fields, _, tensors, data_start = _read_header(gguf_file)
    alignment = next((value for key, _, value, _ in fields if key == "general.alignment"), _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    base = -(-data_start // alignment) * alignment
    return [GgufTensor(name, dims, ggml_type, base + offset) for name, dims, ggml_type, offset in tensors]


def imported_config_and_index(gguf_file: Path) -> tuple[dict, CheckpointIndex]:
    """(config.json as the import writes it, the index of its model.safetensors), without converting."""
    model = header_model(gguf_file).model
    return _config_dict(model), _meta_index(model, gguf_file)


@dataclass(frozen=True, eq=False)
class HeaderModel:
    """What transformers makes of a GGUF's header: the model on the meta device, and what its loader
    hands the tensor processor (the config dict it parsed, the file's architecture name)."""

    model: Any
    gguf_config: dict
    architecture: str


def header_model(gguf_file: Path) -> HeaderModel:
    """transformers' model for the GGUF, built on the meta device from its header alone (no tensors read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with quiet_transformers(), tempfile.TemporaryDirectory() as empty:
        try:
            light = _header_copy(gguf_file, Path(empty) / "header.gguf")
            config = AutoConfig.from_pretrained(empty, gguf_file=str(light))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            parsed = load_gguf_checkpoint(str(light), return_tensors=False)
        except (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError, NotImplementedError,
                struct.error) as err:
            lines = str(err).strip().splitlines()
            reason = lines[0] if lines else type(err).__name__
            raise InvalidModelError(f"cannot read {gguf_file.name}'s header: {reason}") from None
    architecture = next(value for key, _, value, _ in _read_header(gguf_file)[0] if key == "general.architecture")
    return HeaderModel(model, dict(parsed["config"]), architecture)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' and gguf's tqdm bars and log lines; our own progress shows on a TTY."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF dequantizer's own tqdm bar
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


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

    fields, skipped, tensors, _ = _read_header(gguf_file)
    architecture = next(value for key, _, value, _ in fields if key == "general.architecture")
    writer = gguf.GGUFWriter(str(target), architecture)
    for key, value_type, value, item_type in fields:
        if key != "general.architecture":
            writer.add_key_value(key, value, gguf.GGUFValueType(value_type),
                                 sub_type=None if item_type is None else gguf.GGUFValueType(item_type))
    vocab_key = f"{architecture}.vocab_size"
    if "tokenizer.ggml.tokens" in skipped and all(key != vocab_key for key, *_ in fields):
        writer.add_key_value(vocab_key, skipped["tokenizer.ggml.tokens"], gguf.GGUFValueType.UINT32)
    for name, *_ in tensors:
        writer.add_tensor(name, np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _read_header(gguf_file: Path) -> tuple[list[tuple[str, int, Any, Any]], dict[str, int],
                                           list[tuple[str, tuple[int, ...], int, int]], int]:
    """(key, type, value, array item type) of each metadata entry, {key: length} of the skipped
    long arrays, (name, dims, GGML type, data offset) of each tensor, and where the header ends;
    ValueError for a file that is not a GGUF v2/v3."""
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
        tensors = []
        for _ in range(num_tensors):
            name, num_dims = _read_string(handle), _unpack(handle, "<I")
            dims = tuple(_unpack(handle, "<Q") for _ in range(num_dims))
            tensors.append((name, dims, _unpack(handle, "<I"), _unpack(handle, "<Q")))
        header_end = handle.tell()
    return fields, skipped, tensors, header_end


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
