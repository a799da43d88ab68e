"""The offload cache: disk-tier layers stored once in the run dtype, so streaming reads them as is.

When a checkpoint's dtype differs from the run dtype (SmolLM2 imported as float32, run in
bfloat16), every streamed read would move twice the bytes and convert them. Like accelerate's
offload folder, llmrun writes those layers once, converted and already fused, under
$LLMRUN_HOME/offload/<key>/, and streams from there. Files are written to a temporary name and
renamed, so an interrupted run never leaves a half-written unit behind; entries of changed or
removed checkpoints are dropped (weights/offload_cache.py), and `llmrun cache --clear` empties it.

Resident layers of a small model are kept the same way (`kept_converted`): reading SmolLM2's
bf16 copy back takes a fraction of converting its float32 file at every start (~0.3 s of ~3 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmrun.errors import StorageError
from llmrun.storage import writing_under
from llmrun.weights import offload_cache
from llmrun.weights.index import DTYPE_BYTES, TensorInfo
from llmrun.weights.loader import PackedTensor, TensorFileReader, torch_dtype

_TAGS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}


def needs_offload(packs: list[PackedTensor], dtype) -> bool:
    """Whether a float tensor of the unit is stored in another dtype than it is used in: the run's,
    or float32 for a streamed compressed weight's scales and minimums (packed integer parts of
    quantized weights are read as they are)."""
    return any(part.dtype in _FLOAT_TAGS and part.dtype != (packed.staged_as or _TAGS.get(dtype))
               for packed in packs for part in packed.parts)


def _staged(packed: PackedTensor, dtype) -> str:
    """The tag a tensor is used in: its `staged_as` where set, else a float one in the run dtype and
    any other as stored."""
    tag = packed.parts[0].dtype
    return packed.staged_as or (_TAGS[dtype] if tag in _FLOAT_TAGS else tag)


def _unit_file(folder: Path, unit: int, packs: list[PackedTensor]) -> Path:
    """A unit's converted file; a streamed compressed unit (its scales staged as float32) has its own,
    beside the same unit's copy for a resident run."""
    return folder / (f"unit-{unit}-f32-scales.bin" if any(p.staged_as for p in packs) else f"unit-{unit}.bin")


def source_files(packs: dict[int, list[PackedTensor]]) -> list[Path]:
    return sorted({part.file for unit in packs.values() for p in unit for part in p.parts})


def cache_folder(packs: dict[int, list[PackedTensor]], dtype) -> Path:
    """A folder keyed by the source files (path, size, mtime) and the dtype."""
    return offload_cache.entry_folder(source_files(packs), str(dtype))


def offloaded(packs: dict[int, list[PackedTensor]], units: list[int], dtype) -> dict[int, list[PackedTensor]]:
    """For each unit needing conversion, its packed tensors re-pointed at a cached run-dtype file."""
    todo = [u for u in units if needs_offload(packs[u], dtype)]
    if not todo:
        return {}
    folder = cache_folder(packs, dtype)
    offload_cache.prepare_entry(folder, source_files(packs))
    out = {}
    with TensorFileReader() as reader:
        for unit in todo:
            file = _unit_file(folder, unit, packs[unit])
            if not file.exists():
                _write_unit(reader, packs[unit], dtype, file)
            out[unit] = _repoint(packs[unit], dtype, file)
    return out


# Resident weights are kept converted only up to this size: the copy is for start-up, and a large
# model's would cost its run-dtype size again on disk without being asked for.
KEEP_RESIDENT_BYTES = 2 * 2**30


def kept_converted(packs: dict[int, list[PackedTensor]], units: list[int], dtype) -> dict[int, list[PackedTensor]]:
    """offloaded() for resident units, where their converted size is at most KEEP_RESIDENT_BYTES:
    the next start reads the run-dtype copy instead of converting again. Where the copy cannot be
    written (a full or read-only disk) the units load from the checkpoint, converted, as before."""
    todo = [u for u in units if needs_offload(packs[u], dtype)]
    element = torch.empty((), dtype=dtype).element_size()
    size = sum(p.num_elements for u in todo for p in packs[u]) * element
    if not todo or size > KEEP_RESIDENT_BYTES:
        return {}
    try:
        return offloaded(packs, todo, dtype)
    except StorageError:
        return {}


def _write_unit(reader: TensorFileReader, packs: list[PackedTensor], dtype, file: Path) -> None:
    """Convert one unit into `file` via a temporary name; a full disk is a StorageError, no file left."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        with writing_under(file.parent):
            handle = open(tmp, "wb")
        with handle:
            for packed in packs:
                tensor = reader.load_packed(packed, torch_dtype(_staged(packed, dtype)))  # its own errors
                with writing_under(file.parent):
                    handle.write(tensor.view(torch.uint8).numpy().tobytes())
            with writing_under(file.parent):
                handle.flush()
        with writing_under(file.parent):
            os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _repoint(packs: list[PackedTensor], dtype, file: Path) -> list[PackedTensor]:
    out, offset = [], 0
    for packed in packs:
        tag = _staged(packed, dtype)
        size = packed.num_elements * DTYPE_BYTES[tag]
        part = TensorInfo(packed.key, file, tag, packed.shape, offset, offset + size)
        out.append(PackedTensor(packed.key, (part,), packed.shape, packed.staged_as))
        offset += size
    return out
