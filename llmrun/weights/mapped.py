"""Streamed pieces read in place on the CPU: each file mapped once, a piece's tensors views of it.

Where the weights compute on the CPU and a disk piece lies in its file as it is staged (its tensors
back to back in one file, each in its staged dtype at an offset its element size divides: an
offload-cache unit does), copying it into a staging slot repeats what the page cache already
holds, and the copying thread competes with the compute threads for the cores (on two cores the
reader filled slots at ~3 GB/s beside the compute against ~5 GB/s alone, and an int4 SmolLM2 step
waited on it). Here the compute reads a piece through a private mapping of its file (copy-on-write,
never written); when the piece is released its pages leave this process (MADV_DONTNEED: the file's
pages stay in the page cache and a later read maps them again, so the bytes never go stale), so
resident memory stays within what the plan reserved for staging (two pieces). A thread of its
own makes those calls (through ctypes, so without the interpreter lock): taking a piece has it map
the next piece's pages in (MADV_POPULATE_READ, reading them from the file where the page cache has
not got them: the reader thread's part, without the copy) and the kernel read the one after ahead
(MADV_WILLNEED), and releasing one has it drop that piece's pages; the compute thread only queues
the calls, and a page it reaches first it maps itself.
LLMRUN_NO_MAP=1 keeps the reader thread and its slots.
"""

from __future__ import annotations

import ctypes
import mmap
import queue
import sys
import threading
import weakref
from pathlib import Path
from typing import Callable, Optional

import torch

from llmrun import settings
from llmrun.errors import InvalidModelError
from llmrun.weights.index import DTYPE_BYTES
from llmrun.weights.loader import torch_dtype
from llmrun.weights.pieces import Piece

MADV_POPULATE_READ = 22  # Linux 5.14: map a range's pages in, reading what the page cache lacks


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


def _advise_loop(jobs: queue.SimpleQueue, can_populate: list) -> None:
    """The advisor thread: each queued (mapping, address, length, advice) made, until None. (Not a
    method: the thread must not keep its _Advisor alive, whose collection is what stops it.)"""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    while (job := jobs.get()) is not None:
        if isinstance(job, threading.Event):  # settle(): the calls queued before it are made
            job.set()
            continue
        _mapping, address, length, advice = job
        if advice != MADV_POPULATE_READ:
            madvise(address, length, advice)
        elif not can_populate[0] or madvise(address, length, advice):
            can_populate[0] = False  # an older kernel (EINVAL): the next piece is only read ahead
            madvise(address, length, mmap.MADV_WILLNEED)


class _Advisor:
    """A thread making madvise calls queued by the compute thread. A queued call holds its mapping, so
    the range stays mapped (never another mapping's memory) until the call is made."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._can_populate = [True]
        threading.Thread(target=_advise_loop, args=(self.jobs, self._can_populate), name="llmrun-map-advisor",
                         daemon=True).start()
        self._finalizer = weakref.finalize(self, self.jobs.put, None)  # collected or closed: the thread ends

    @property
    def populate(self) -> bool:
        """Whether MADV_POPULATE_READ works here (else the next piece is only read ahead)."""
        return self._can_populate[0]

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the calls queued so far are made."""
        done = threading.Event()
        self.jobs.put(done)
        done.wait(timeout)

    def close(self) -> None:
        self._finalizer()


class MappedPieces:
    """Disk pieces as views of their files' mappings, taken in the streamer's cyclic order."""

    def __init__(self, pieces: list[Piece], order: list[int]):
        self.pieces, self.order = pieces, order
        self._position = {index: position for position, index in enumerate(order)}
        self._maps: dict[Path, tuple[mmap.mmap, int]] = {}  # file -> (mapping, its address)
        self._views: dict[int, dict] = {}
        self._ranges: dict[int, tuple[mmap.mmap, int, int]] = {}  # piece -> (mapping, page address, length)
        for index in order:
            file, first, end = _file_range(pieces[index])
            if file not in self._maps:
                with open(file, "rb") as handle:  # ACCESS_COPY: writable views for torch, never written
                    whole = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                self._maps[file] = (whole, ctypes.addressof(ctypes.c_char.from_buffer(whole)))
            whole, address = self._maps[file]
            if end > len(whole):
                raise InvalidModelError(f"{file} is truncated (reading tensor {pieces[index].tensors[-1].packed.key})")
            start = first // mmap.PAGESIZE * mmap.PAGESIZE
            self._ranges[index] = (whole, address + start, end - start)
            self._views[index] = {t.packed.key: self._view(whole, t) for t in pieces[index].tensors}
        self._advisor = _Advisor()
        self._expected = 0  # the position of the piece the cycle takes next

    @staticmethod
    def _view(whole: mmap.mmap, tensor) -> torch.Tensor:
        part = tensor.packed.parts[0]
        return torch.frombuffer(whole, dtype=torch.uint8, count=tensor.num_bytes, offset=part.start).view(
            torch_dtype(tensor.tag)).view(tensor.packed.shape)

    def take(self, index: int) -> tuple[dict, Callable[[], None]]:
        """Piece `index`'s tensors and the call that releases them (its pages leave this process).
        Pieces skipped since the last one taken (the head, in a prefill chunk that samples nothing)
        drop the pages mapped in ahead for them."""
        position = self._position[index]
        while self._expected % len(self.order) != position:
            self._advise(self.order[self._expected % len(self.order)], mmap.MADV_DONTNEED)
            self._expected += 1
        self._expected = position + 1
        self._advise(self.order[(position + 1) % len(self.order)], MADV_POPULATE_READ)
        self._advise(self.order[(position + 2) % len(self.order)], mmap.MADV_WILLNEED)  # read ahead, not mapped
        return self._views[index], lambda: self._advise(index, mmap.MADV_DONTNEED)

    def _advise(self, index: int, advice: int) -> None:
        whole, address, length = self._ranges[index]
        if length > 0:
            self._advisor.jobs.put((whole, address, length, advice))

    def settle(self) -> None:
        """Wait until the page calls queued so far are made (tests, measurements)."""
        self._advisor.settle()

    def close(self) -> None:
        self._advisor.close()
        self._views.clear()  # the mappings go with the last view of them (and the last queued call)
        self._maps.clear()
