"""Reading tensors out of safetensors files with pread (no pickle), packed as the decoder wants; a
mapping only for bytes read once and copied at once (`mapped`, for packing).

A decoder names its tensors as a layout: key -> the Hugging Face tensors concatenated along dim 0
(q/k/v into one `qkv`). Concatenation along dim 0 of row-major tensors is byte concatenation, so a
packed tensor is filled part by part in place, with no temporary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from llmrun.errors import InvalidModelError
from llmrun.weights.index import CheckpointIndex, TensorInfo

SCRATCH_BYTES = 8 * 1024 * 1024


def torch_dtype(tag: str):
    """The torch dtype for a safetensors dtype tag."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }[tag]


@dataclass(frozen=True)
class PackedTensor:
    """One decoder tensor made of checkpoint tensors stacked along dim 0."""

    key: str
    parts: tuple[TensorInfo, ...]
    shape: tuple[int, ...]
    staged_as: str = ""  # the dtype it is staged in where not staged_tag's (a compressed weight's float32 scales)

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


FLOAT_TAGS = frozenset({"F64", "F32", "F16", "BF16"})


def dtype_tag(dtype) -> str:
    """The safetensors tag of a torch dtype (the run dtype's, for staged tensors)."""
    import torch

    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}[dtype]


def staged_tag(tag: str, run_tag: str) -> str:
    """The dtype a tensor is used in: a float tensor in the run dtype, any other (int8 or uint8
    packed weights) as stored."""
    return run_tag if tag in FLOAT_TAGS else tag


def pack_layout(index: CheckpointIndex, layout: dict[str, tuple[str, ...]]) -> list[PackedTensor]:
    """Resolve a layout against the index; a missing tensor is an InvalidModelError."""
    packed = []
    for key, names in layout.items():
        missing = [name for name in names if name not in index]
        if missing:
            raise InvalidModelError(f"{index.folder} lacks tensor {missing[0]}")
        parts = tuple(index[name] for name in names)
        rows = sum(part.shape[0] for part in parts)
        packed.append(PackedTensor(key, parts, (rows, *parts[0].shape[1:])))
    return packed


def row_range(packed: PackedTensor, first: int, last: int) -> PackedTensor:
    """Rows [first, last) of a packed tensor, its parts pointing into the same files."""
    parts, row = [], 0
    for part in packed.parts:
        rows = part.shape[0]
        lo, hi = max(first, row), min(last, row + rows)
        if lo < hi:
            row_bytes = part.num_bytes // rows
            start = part.start + (lo - row) * row_bytes
            parts.append(TensorInfo(part.name, part.file, part.dtype, (hi - lo, *part.shape[1:]),
                                    start, start + (hi - lo) * row_bytes))
        row += rows
    return PackedTensor(packed.key, tuple(parts), (last - first, *packed.shape[1:]), packed.staged_as)


class TensorFileReader:
    """pread-based reads of tensor bytes; converts dtype through a reusable scratch buffer."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, object] = {}
        self._scratch = None
        self.bytes_read = 0

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def _pread_into(self, info: TensorInfo, buffer) -> None:
        """Read the tensor's bytes into `buffer` (a contiguous CPU uint8 tensor of its size)."""
        self._pread_view(info, memoryview(buffer.numpy()).cast("B"))
        self.bytes_read += info.num_bytes

    def _pread_view(self, info: TensorInfo, view: memoryview, done: int = 0) -> None:
        """The tensor's bytes from `done` on into `view` (a byte memoryview of its size)."""
        fd = self._fd(info.file)
        while done < info.num_bytes:
            count = os.preadv(fd, [view[done:]], info.start + done)
            if count <= 0:
                raise InvalidModelError(f"{info.file} is truncated (reading tensor {info.name})")
            done += count

    def read_run(self, run: list[tuple[TensorInfo, memoryview]]) -> None:
        """Tensors lying back to back in one file, each into its own byte view, with one preadv; a
        short read (rare: a very large run, or a truncated file) is finished tensor by tensor."""
        first = run[0][0]
        total = sum(info.num_bytes for info, _ in run)
        count = os.preadv(self._fd(first.file), [view for _, view in run], first.start)
        if count < total:
            start = 0
            for info, view in run:
                if start + info.num_bytes > count:
                    self._pread_view(info, view, max(count - start, 0))
                start += info.num_bytes
        self.bytes_read += total

    def read_into(self, info: TensorInfo, dst) -> None:
        """Fill the contiguous CPU tensor `dst` (any dtype, same element count) with the tensor.

        A dtype conversion goes through a scratch buffer of at most SCRATCH_BYTES, chunk by chunk.
        """
        import torch

        src_dtype = torch_dtype(info.dtype)
        if dst.dtype == src_dtype:
            self._pread_into(info, dst.view(torch.uint8).reshape(-1))
            return
        if self._scratch is None:
            self._scratch = torch.empty(SCRATCH_BYTES, dtype=torch.uint8)
        elem = torch.empty((), dtype=src_dtype).element_size()
        flat, per_chunk = dst.reshape(-1), SCRATCH_BYTES // elem
        for first in range(0, info.num_elements, per_chunk):
            count = min(per_chunk, info.num_elements - first)
            chunk = TensorInfo(info.name, info.file, info.dtype, (count,),
                               info.start + first * elem, info.start + (first + count) * elem)
            raw = self._scratch[: count * elem]
            self._pread_into(chunk, raw)
            flat[first : first + count].copy_(raw.view(src_dtype))

    def fill_packed(self, packed: PackedTensor, dst) -> None:
        """Fill `dst` (contiguous CPU, packed.shape) part by part."""
        flat, offset = dst.reshape(-1), 0
        for part in packed.parts:
            self.read_into(part, flat[offset : offset + part.num_elements])
            offset += part.num_elements

    def load_packed(self, packed: PackedTensor, dtype, device=None, pin: bool = False):
        """A new tensor holding `packed` in `dtype`, on `device` (read via CPU memory)."""
        import torch

        host = torch.empty(packed.shape, dtype=dtype, pin_memory=pin)
        self.fill_packed(packed, host)
        if device is None or torch.device(device).type == "cpu":
            return host
        return host.to(device)

    def mapped(self, info: TensorInfo):
        """The tensor's bytes as stored, read through a private mapping of its file: no copy and no
        new pages, for a caller that only reads them once (packing). Valid while the reader is open."""
        import mmap

        import torch

        if info.file not in self._maps:
            with open(info.file, "rb") as handle:
                self._maps[info.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        whole = self._maps[info.file]
        if info.end > len(whole):
            raise InvalidModelError(f"{info.file} is truncated (reading tensor {info.name})")
        self.bytes_read += info.num_bytes
        return torch.frombuffer(whole, dtype=torch.uint8, count=info.num_bytes, offset=info.start).view(
            torch_dtype(info.dtype)).view(info.shape)

    def drop_mapped(self, info: TensorInfo) -> None:
        """Drop the pages `mapped(info)` brought into this process (MADV_DONTNEED: the file's pages stay
        in the page cache, and a view read again maps them again)."""
        import mmap

        whole = self._maps.get(info.file)
        if whole is not None and hasattr(mmap, "MADV_DONTNEED"):
            start = info.start // mmap.PAGESIZE * mmap.PAGESIZE
            whole.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps.clear()  # each mapping goes once no tensor uses its bytes

    def __enter__(self) -> "TensorFileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

