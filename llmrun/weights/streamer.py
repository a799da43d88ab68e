"""LayerStreamer: brings non-resident pieces of the weights to the compute device just in time, with prefetch.

It alone owns the staging slots, the background disk reader, CUDA copy streams and their events.
Streamed pieces (weights/pieces.py: whole layers, a layer's matrices, runs of the head's rows) are
consumed in a fixed cyclic order, so the reader can run ahead across layers and steps: while piece
i computes, pieces i+1..i+depth are being read (disk) or copied (pinned host -> GPU). Slots are
byte buffers sized for the largest piece; a piece's tensors are views of any dtype into them. On a
CPU, disk pieces lying in their files as staged are instead read in place (weights/mapped.py).
A layer streamed matrix by matrix is read through a StagedLayer (each matrix valid until a later one).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from llmrun.weights.loader import TensorFileReader
from llmrun.weights.mapped import MappedPieces, mappable
from llmrun.weights.pieces import Piece, ViewCache
from llmrun.weights.quantized import UnitParts


class _Slot:
    def __init__(self, flat: torch.Tensor):
        self.flat = flat  # uint8
        self.piece: int | None = None
        self.ready = threading.Event()
        self.free = threading.Event()
        self.free.set()
        self.copied: torch.cuda.Event | None = None  # GPU path: host slot reusable after this


class _ReaderState:
    """Everything the reader thread touches (not the DiskReader, so that can be collected)."""

    def __init__(self, order: list[int], pieces: list[Piece], slots: list[_Slot]):
        self.order, self.pieces, self.slots = order, pieces, slots
        self.views = ViewCache(pieces)  # the reader thread's own
        self.reader = TensorFileReader()
        self.stop = False
        self.error: BaseException | None = None

    def run(self) -> None:
        position = 0
        try:
            while True:
                slot = self.slots[position % len(self.slots)]
                slot.free.wait()
                if self.stop:
                    return
                if slot.copied is not None:
                    slot.copied.synchronize()
                    slot.copied = None
                slot.free.clear()
                index = self.order[position % len(self.order)]
                self.views.reads(index, slot.flat).fill(self.reader)
                slot.piece = index
                slot.ready.set()
                position += 1
        except BaseException as err:  # surfaced to the consumer, which raises it
            self.error = err
            for slot in self.slots:
                slot.ready.set()
        finally:
            self.reader.close()

    def shutdown(self, thread: threading.Thread) -> None:
        self.stop = True
        for slot in self.slots:
            slot.free.set()
        if thread is not threading.current_thread():  # (the reader's own collection may drop its DiskReader)
            thread.join(timeout=10)


class DiskReader:
    """A background thread filling a ring of host byte buffers with disk pieces, in cyclic order."""

    def __init__(self, order: list[int], pieces: list[Piece], num_slots: int, pin: bool):
        size = max(pieces[i].num_bytes for i in order)
        self.slots = [_Slot(torch.empty(size, dtype=torch.uint8, pin_memory=pin)) for _ in range(num_slots)]
        self._state = _ReaderState(order, pieces, self.slots)
        self._consumed = 0
        thread = threading.Thread(target=self._state.run, name="llmrun-disk-reader", daemon=True)
        thread.start()
        # Stop the thread when this reader is dropped or the interpreter exits (before torch unloads).
        self._finalizer = weakref.finalize(self, self._state.shutdown, thread)

    def take(self, index: int) -> _Slot:
        """The slot holding piece `index`, skipping (and releasing) pieces the consumer did not use."""
        while True:
            slot = self.slots[self._consumed % len(self.slots)]
            slot.ready.wait()
            if self._state.error is not None:
                raise self._state.error
            self._consumed += 1
            if slot.piece == index:
                return slot
            self.give_back(slot)

    def give_back(self, slot: _Slot, copied=None) -> None:
        slot.ready.clear()
        slot.copied = copied
        slot.free.set()

    def close(self) -> None:
        self._finalizer()


@dataclass(frozen=True)
class Held:
    """A staged piece's tensors on the compute device, valid until `release()`."""

    tensors: dict
    release: Callable[[], None]


def _mapped(pieces: list[Piece], disk_pieces: list[int]) -> Optional[MappedPieces]:
    """The disk pieces read in place, or None where the files cannot be mapped (a file system without
    mmap): the reader thread copies them then."""
    try:
        return MappedPieces(pieces, disk_pieces)
    except OSError:
        return None


class LayerStreamer:
    """Stages pieces on the compute device, in their cyclic order.

    `sources[i]` is piece i's bytes in pinned host memory (CPU tier) or None (disk tier).
    """

    def __init__(self, pieces: list[Piece], sources: list, device, prefetch_depth: int = 1):
        self.device = torch.device(device)
        self.pieces = pieces
        self.sources = sources
        self.order = list(range(len(pieces)))
        self.views = ViewCache(pieces)
        self.num_slots = prefetch_depth + 1
        self.bytes_moved = 0
        disk_pieces = [i for i in self.order if sources[i] is None]
        gpu = self.device.type == "cuda"
        in_place = bool(disk_pieces) and not gpu and mappable(pieces, disk_pieces)  # (weights/mapped.py)
        self.mapped = _mapped(pieces, disk_pieces) if in_place else None
        self.disk = DiskReader(disk_pieces, pieces, self.num_slots, pin=gpu) if disk_pieces and self.mapped is None else None
        self._gpu = None
        if gpu:
            self._gpu = _GpuRing(max(p.num_bytes for p in pieces), self.num_slots, self.device)

    def take(self, index: int) -> Held:
        """Piece `index` on the compute device; pieces before it in the cycle that were not taken
        are skipped (the head in a prefill chunk that samples nothing)."""
        piece = self.pieces[index]
        self.bytes_moved += piece.num_bytes
        if self.mapped is not None:
            return Held(*self.mapped.take(index))
        if self._gpu is None:
            slot = self.disk.take(index)
            return Held(self.views.views(index, slot.flat), lambda: self.disk.give_back(slot))
        buffer_slot = self._gpu.acquire(index, self)
        return Held(self.views.views(index, self._gpu.buffers[buffer_slot]),
                    lambda: self._gpu.release(buffer_slot, self))

    @contextmanager
    def staged(self, index: int) -> Iterator[dict]:
        """Piece `index`'s tensors on the compute device, valid inside the block."""
        held = self.take(index)
        try:
            yield held.tensors
        finally:
            held.release()

    def host_source(self, index: int):
        """(host uint8 tensor, release callback) for a GPU copy of piece `index`."""
        source = self.sources[index]
        if source is not None:
            return source, lambda event: None
        slot = self.disk.take(index)
        return slot.flat, lambda event: self.disk.give_back(slot, copied=event)

    @property
    def disk_reads(self) -> Optional[str]:
        """How disk pieces reach the compute: read in place from the file's mapping (a CPU,
        weights/mapped.py) or copied into staging buffers by the reader thread; None without any."""
        if self.mapped is not None:
            return "in place (mapped)"
        return None if self.disk is None else "copied (reader thread)"

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
        if self.mapped is not None:
            self.mapped.close()


class _GpuRing:
    """GPU staging byte buffers filled on a side stream; events order copies against compute."""

    def __init__(self, size: int, num_slots: int, device):
        self.buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        self.ready = [torch.cuda.Event() for _ in range(num_slots)]
        self.free = [None] * num_slots
        self.stream = torch.cuda.Stream(device=device)
        self.pending: deque[tuple[int, int]] = deque()  # (piece, slot) copies issued, not consumed
        self.next_slot = 0
        self.next_position = 0

    def _issue(self, streamer: LayerStreamer) -> None:
        index = streamer.order[self.next_position % len(streamer.order)]
        slot = self.next_slot
        self.next_position += 1
        self.next_slot = (slot + 1) % len(self.buffers)
        host, release = streamer.host_source(index)
        count = streamer.pieces[index].num_bytes
        with torch.cuda.stream(self.stream):
            if self.free[slot] is not None:
                self.stream.wait_event(self.free[slot])
            self.buffers[slot][:count].copy_(host[:count], non_blocking=True)
            self.ready[slot].record(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        release(done)
        self.pending.append((index, slot))

    def acquire(self, index: int, streamer: LayerStreamer) -> int:
        """The slot piece `index` is copied into, the compute stream ordered after the copy."""
        while len(self.pending) < len(self.buffers):
            self._issue(streamer)
        while self.pending[0][0] != index:  # a piece the step did not use (the head in a prefill chunk)
            _, skipped = self.pending.popleft()
            self._mark_free(skipped)
            self._issue(streamer)
        _, slot = self.pending.popleft()
        torch.cuda.current_stream(self.buffers[slot].device).wait_event(self.ready[slot])
        return slot

    def release(self, slot: int, streamer: LayerStreamer) -> None:
        """The slot is free once the compute queued so far is done; the next copy goes into it."""
        self._mark_free(slot)
        self._issue(streamer)

    def _mark_free(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.buffers[slot].device))
        self.free[slot] = event


class StagedLayer(Mapping):
    """A layer staged matrix by matrix: each piece is valid until the layer asks for a later one.

    The streamer stages a layer's matrices in its layout's order, so a layer's code must first ask
    for them in that order (a matrix asked for after a later one is an error, never stale data).
    Its norms stay resident and can be asked for at any time."""

    def __init__(self, streamer: LayerStreamer, pieces: list[int], vectors: dict, parts: UnitParts):
        self._streamer, self._pieces, self._vectors, self._parts = streamer, pieces, vectors, parts
        self._position = {key: position for position, index in enumerate(pieces)
                          for key in streamer.pieces[index].keys}
        self._held: Optional[Held] = None
        self._held_position = -1

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._vectors:
            return self._vectors[key]
        position = self._position[key]
        if position < self._held_position or (position == self._held_position and self._held is None):
            raise RuntimeError(f"a streamed layer's {key!r} was asked for after a later matrix: a layer "
                               f"must use its matrices in its layout's order")
        if position > self._held_position:
            self.release()  # before taking the next: that slot is what the reader fills next
            self._held, self._held_position = self._streamer.take(self._pieces[position]), position
        if key in self._parts.merged:  # a compressed matrix: its parts staged in the same piece
            return self._parts.weight(self._held.tensors, key)
        return self._held.tensors[key]

    def __contains__(self, key) -> bool:
        return key in self._vectors or key in self._position

    def __iter__(self):
        return iter([*self._vectors, *self._position])

    def __len__(self) -> int:
        return len(self._vectors) + len(self._position)

    def release(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None
