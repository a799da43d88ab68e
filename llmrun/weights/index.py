"""CheckpointIndex: tensor name -> file, dtype, shape, byte range, built from safetensors headers only."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from llmrun.errors import InvalidModelError

# safetensors dtype tags -> bytes per element.
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute byte range [start, end) in `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def num_bytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a checkpoint folder, from headers alone (no tensor data is read)."""

    folder: Path
    tensors: dict[str, TensorInfo]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    @property
    def total_bytes(self) -> int:
        return sum(t.num_bytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.num_elements for t in self.tensors.values())


def read_header(file: Path) -> tuple[dict, int]:
    """Parse one safetensors header; returns (header dict, offset where tensor data starts).

    Raises InvalidModelError naming the file when it is truncated or not safetensors.
    """
    try:
        file_bytes = os.path.getsize(file)
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InvalidModelError(f"{file} is truncated (no safetensors header)")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(_MAX_HEADER_BYTES, file_bytes - 8):
                raise InvalidModelError(f"{file} is corrupt or truncated (bad safetensors header)")
            raw = handle.read(header_bytes)
    except OSError as err:
        raise InvalidModelError(f"cannot read {file}: {err.strerror}") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidModelError(f"{file} is corrupt (unreadable safetensors header)") from err
    if not isinstance(header, dict):
        raise InvalidModelError(f"{file} is corrupt (unreadable safetensors header)")
    return header, 8 + header_bytes


def index_file(file: Path) -> dict[str, TensorInfo]:
    """Index one safetensors file, checking every byte range lies inside the file."""
    header, data_start = read_header(file)
    file_bytes = os.path.getsize(file)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            expected_bytes = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidModelError(f"{file} is corrupt (bad entry for tensor {name!r})") from err
        if end - begin != expected_bytes or begin < 0:
            raise InvalidModelError(f"{file} is corrupt (tensor {name!r} has a wrong byte range)")
        if data_start + end > file_bytes:
            raise InvalidModelError(
                f"{file} is truncated: tensor {name!r} needs {data_start + end} bytes, "
                f"the file has {file_bytes}"
            )
        tensors[name] = TensorInfo(name, file, dtype, shape, data_start + begin, data_start + end)
    return tensors


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (the shard index's list when present)."""
    folder = Path(folder)
    shard_index = folder / "model.safetensors.index.json"
    if shard_index.is_file():
        try:
            weight_map = json.loads(shard_index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise InvalidModelError(f"{shard_index} is corrupt") from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InvalidModelError(f"{folder} is missing weight shards: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidModelError(f"{folder} has no .safetensors weights")
    return files


def build_index(folder: Path) -> CheckpointIndex:
    """Index all tensors of a checkpoint folder from headers."""
    tensors: dict[str, TensorInfo] = {}
    for file in weight_files(folder):
        tensors.update(index_file(file))
    return CheckpointIndex(Path(folder), tensors)
