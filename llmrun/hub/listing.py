"""`llmrun models`: the complete models in llmrun's store and the Hub cache, described from headers only."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llmrun.hub import hf_cache, store
from llmrun.hub.source import INDEX_FILE

# safetensors dtype codes → the names torch and config.json use.
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    architecture: str | None
    num_parameters: int | None  # None when a header could not be read
    dtype: str | None  # the most common tensor dtype
    size_bytes: int  # the weights on disk
    source: str  # "store" or "hf-cache"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "architecture": self.architecture,
            "parameters": self.num_parameters,
            "dtype": self.dtype,
            "size_bytes": self.size_bytes,
            "source": self.source,
        }


def list_local_models() -> list[LocalModel]:
    """The store's entries, then the Hub cache's complete repos; incomplete ones are skipped."""
    models = [describe_model(folder.name, folder, "store") for folder in store.list_entries()]
    for repo in hf_cache.list_cached_repos():
        models.append(describe_model(repo.repo_id, repo.snapshot_path, "hf-cache"))
    return models


def describe_model(name: str, folder: Path, source: str) -> LocalModel:
    """A LocalModel for a validated folder: config.json's architecture plus safetensors header totals."""
    weight_files = weight_files_of(Path(folder))
    size_bytes = sum(file.stat().st_size for file in weight_files)
    num_parameters: int | None = 0
    dtype_counts: Counter[str] = Counter()
    for file in weight_files:
        try:
            file_counts = _parameters_by_dtype(file)
        except (OSError, ValueError):
            num_parameters = None
            continue
        dtype_counts.update(file_counts)
        if num_parameters is not None:
            num_parameters += sum(file_counts.values())
    dtype = dtype_counts.most_common(1)[0][0] if dtype_counts else None
    return LocalModel(
        name=name,
        path=Path(folder),
        architecture=_architecture(Path(folder)),
        num_parameters=num_parameters,
        dtype=DTYPE_NAMES.get(dtype, dtype),
        size_bytes=size_bytes,
        source=source,
    )


def weight_files_of(folder: Path) -> list[Path]:
    """The shards the index names when there is one (repos may hold extra copies), else *.safetensors."""
    try:
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        return sorted(folder / name for name in set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sorted(folder.glob("*.safetensors"))


def read_safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (weights/index.py reads it; ValueError when unreadable)."""
    from llmrun.errors import InvalidModelError
    from llmrun.weights.index import read_header

    try:
        return read_header(Path(file))[0]
    except InvalidModelError as err:
        raise ValueError(str(err)) from err


def _parameters_by_dtype(file: Path) -> Counter[str]:
    """How many parameters of each dtype a safetensors file holds (from its header alone)."""
    counts: Counter[str] = Counter()
    for tensor_name, info in read_safetensors_header(file).items():
        if tensor_name == "__metadata__":
            continue
        try:
            counts[info["dtype"]] += math.prod(info["shape"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{file}: bad header entry for {tensor_name}") from err
    return counts


def _architecture(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") or []
    return architectures[0] if architectures else config.get("model_type")
