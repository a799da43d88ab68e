"""Read tensors named by a CheckpointIndex out of safetensors files (mmap, no pickle)."""

from __future__ import annotations

import mmap
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmrun.errors import InvalidModelError
from llmrun.weights.index import CheckpointIndex, TensorInfo

_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def torch_dtype(tag: str):
    """The torch dtype for a safetensors dtype tag."""
    import torch

    return getattr(torch, _TORCH_DTYPES[tag])


class WeightReader:
    """Copies tensors out of memory-mapped checkpoint files; owns the maps until `close()`."""

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as handle:
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def view(self, info: TensorInfo):
        """A zero-copy tensor over the mapped bytes (valid until close)."""
        import torch

        dtype = torch_dtype(info.dtype)
        if info.num_elements == 0:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.frombuffer(
            self._map(info.file), dtype=dtype, count=info.num_elements, offset=info.start
        )
        return flat.view(info.shape)

    def load(self, name: str, dtype=None, device=None):
        """An owned copy of tensor `name`, converted to `dtype` and placed on `device`."""
        view = self.view(self.index[name])
        out = view.to(device=device, dtype=dtype or view.dtype, copy=True)
        return out.contiguous()

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()

    def __enter__(self) -> "WeightReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ResidentWeights:
    """All of a model's tensors in memory on one device: `globals` and per-layer dicts."""

    def __init__(self, globals_: dict, layers: list[dict]):
        self.globals = globals_
        self.layers = layers

    @contextmanager
    def layer(self, layer_idx: int) -> Iterator[dict]:
        yield self.layers[layer_idx]


def load_tensors(reader: WeightReader, names: dict[str, str], dtype, device) -> dict:
    """Load {key: hf_name} as {key: tensor}; a missing tensor is an InvalidModelError."""
    missing = [name for name in names.values() if name not in reader.index]
    if missing:
        raise InvalidModelError(
            f"{reader.index.folder} lacks tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return {key: reader.load(name, dtype, device) for key, name in names.items()}


def load_resident_weights(decoder, index: CheckpointIndex, dtype, device, on_layer=None) -> ResidentWeights:
    """Load every tensor the decoder names, prepared (fused) for its forward."""
    with WeightReader(index) as reader:
        globals_ = load_tensors(reader, decoder.global_tensor_names(), dtype, device)
        layers = []
        for layer_idx in range(decoder.config.num_hidden_layers):
            raw = load_tensors(reader, decoder.layer_tensor_names(layer_idx), dtype, device)
            layers.append(decoder.prepare_layer(raw))
            if on_layer is not None:
                on_layer(layer_idx)
    return ResidentWeights(globals_, layers)
