"""Streamed pieces read in place on the CPU: each file mapped once, a piece's tensors views of it.

Where the weights compute on the CPU and a disk piece lies in its file as it is staged (its tensors
back to back in one file, each in its staged dtype at an offset its element size divides: an
offload-cache unit does), copying it into a staging slot repeats what the page cache already
holds, and the copying thread competes with the compute threads for the cores (on two cores the
reader filled slots at ~3 GB/s beside the compute against ~5 GB/s alone, and an int4 SmolLM2 step
waited on it). Here the compute reads a piece through a private mapping of its file (copy-on-write,
never written); when the piece is released its pages leave this process (MADV_DONTNEED: the file's
pages stay in the page cache and a later read maps them again, so the bytes never go stale), so
resident memory holds at most the pieces taken and not yet released, within what the plan reserved
for staging (two pieces). Taking a piece asks the kernel to read the next two ahead (MADV_WILLNEED:
the reader thread's part, without the copy, and done by the kernel while the layer computes); their
pages are mapped only when the compute reaches them. Every call is made at once by the compute
thread: a thread of our own making the calls (an earlier version, which also mapped the next piece
in ahead) let them lag behind the compute on busy cores, so a released piece's pages stayed, and
SmolLM2 int4 under 150 MB once peaked at 156 MB over the baseline.
LLMRUN_NO_MAP=1 keeps the reader thread and its slots.
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from llmrun import settings
from llmrun.errors import InvalidModelError
from llmrun.weights.index import DTYPE_BYTES
from llmrun.weights.loader import torch_dtype
from llmrun.weights.pieces import Piece


def _file_range(piece: Piece) -> Optional[tuple[Path, int, int]]:
    """(file, first byte, end) where every tensor of the piece lies as staged in one file, else None."""
    files, first, end = set(), None, 0
    for tensor in piece.tensors:
        parts = tensor.packed.parts
        if any(part.dtype != tensor.tag for part in parts):  # converted when staged (a float to the run dtype)
            return None
        if any(a.end != b.start for a, b in zip(parts, parts[1:])):  # stacked from tensors apart in the file
            return None
        if parts[0].start % DTYPE_BYTES[tensor.tag]:
            return None
        files.update(part.file for part in parts)
        first = parts[0].start if first is None else min(first, parts[0].start)
        end = max(end, parts[-1].end)
    return (files.pop(), first, end) if len(files) == 1 else None


def mappable(pieces: list[Piece], indices: list[int]) -> bool:
    """Whether every piece of `indices` can be read in place (on Linux, where madvise does what is
    said above, and unless LLMRUN_NO_MAP=1)."""
    return (sys.platform == "linux" and not settings.LLMRUN_NO_MAP.is_on()
            and all(_file_range(pieces[i]) is not None for i in indices))


class MappedPieces:
    """Disk pieces as views of their files' mappings, taken in the streamer's cyclic order."""

    def __init__(self, pieces: list[Piece], order: list[int]):
        self.order = order
        self._position = {index: position for position, index in enumerate(order)}
        self._maps: dict[Path, mmap.mmap] = {}
        self._views: dict[int, dict] = {}
        self._ranges: dict[int, tuple[mmap.mmap, int, int]] = {}  # piece -> (mapping, first page's offset, length)
        for index in order:
            file, first, end = _file_range(pieces[index])
            if file not in self._maps:
                with open(file, "rb") as handle:  # ACCESS_COPY: writable views for torch, never written
                    self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            whole = self._maps[file]
            if end > len(whole):
                raise InvalidModelError(f"{file} is truncated (reading tensor {pieces[index].tensors[-1].packed.key})")
            start = first // mmap.PAGESIZE * mmap.PAGESIZE
            self._ranges[index] = (whole, start, end - start)
            self._views[index] = {t.packed.key: self._view(whole, t) for t in pieces[index].tensors}

    @staticmethod
    def _view(whole: mmap.mmap, tensor) -> torch.Tensor:
        part = tensor.packed.parts[0]
        return torch.frombuffer(whole, dtype=torch.uint8, count=tensor.num_bytes, offset=part.start).view(
            torch_dtype(tensor.tag)).view(tensor.packed.shape)

    def take(self, index: int) -> tuple[dict, Callable[[], None]]:
        """Piece `index`'s tensors and the call that releases them (its pages leave this process)."""
        position = self._position[index]
        for ahead in (1, 2):  # read ahead by the kernel, not mapped
            self._advise(self.order[(position + ahead) % len(self.order)], mmap.MADV_WILLNEED)
        return self._views[index], lambda: self._advise(index, mmap.MADV_DONTNEED)

    def _advise(self, index: int, advice: int) -> None:
        whole, start, length = self._ranges[index]
        if length > 0:
            whole.madvise(advice, start, length)

    def close(self) -> None:
        self._views.clear()  # the mappings go with the last view of them
        self._maps.clear()
