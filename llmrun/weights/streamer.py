"""LayerStreamer: brings non-resident layers to the compute device just in time, with prefetch.

It alone owns the staging ring, the background disk reader, CUDA copy streams and their events.
Streamed units (decoder layers, and the output head when it is not resident) are consumed in a
fixed cyclic order, so the reader can run ahead across steps: while unit i computes, units
i+1..i+depth are being read (disk) or copied (pinned host -> GPU).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from llmrun.weights.loader import PackedTensor, TensorFileReader, packed_elements, views_into


class _Slot:
    def __init__(self, flat: torch.Tensor):
        self.flat = flat
        self.unit: int | None = None
        self.ready = threading.Event()
        self.free = threading.Event()
        self.free.set()
        self.copied: torch.cuda.Event | None = None  # GPU path: host slot reusable after this


class _ReaderState:
    """Everything the reader thread touches (not the DiskReader, so that can be collected)."""

    def __init__(self, order, packs, slots):
        self.order, self.packs, self.slots = order, packs, slots
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
                unit = self.order[position % len(self.order)]
                for packed, view in zip(self.packs[unit], views_into(slot.flat, self.packs[unit]).values()):
                    self.reader.fill_packed(packed, view)
                slot.unit = unit
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
        thread.join(timeout=10)


class DiskReader:
    """A background thread filling a ring of host buffers with disk units, in cyclic order."""

    def __init__(self, order: list[int], packs: dict[int, list[PackedTensor]], num_slots: int,
                 dtype, pin: bool):
        size = max(packed_elements(packs[u]) for u in order)
        self.slots = [_Slot(torch.empty(size, dtype=dtype, pin_memory=pin)) for _ in range(num_slots)]
        self._state = _ReaderState(order, packs, self.slots)
        self._consumed = 0
        thread = threading.Thread(target=self._state.run, name="llmrun-disk-reader", daemon=True)
        thread.start()
        # Stop the thread when this reader is dropped or the interpreter exits (before torch unloads).
        self._finalizer = weakref.finalize(self, self._state.shutdown, thread)

    def take(self, unit: int) -> _Slot:
        """The slot holding `unit`, skipping (and releasing) units the consumer did not use."""
        while True:
            slot = self.slots[self._consumed % len(self.slots)]
            slot.ready.wait()
            if self._state.error is not None:
                raise self._state.error
            self._consumed += 1
            if slot.unit == unit:
                return slot
            self.give_back(slot)

    def give_back(self, slot: _Slot, copied=None) -> None:
        slot.ready.clear()
        slot.copied = copied
        slot.free.set()

    def close(self) -> None:
        self._finalizer()


class LayerStreamer:
    """Yields streamed units on the compute device.

    `sources[u]` is either a pinned host flat tensor (CPU tier) or None (disk tier).
    """

    def __init__(self, packs: dict[int, list[PackedTensor]], sources: dict, dtype, device,
                 prefetch_depth: int = 1, on_unit: Callable[[int, int], None] | None = None):
        self.device = torch.device(device)
        self.packs = packs
        self.sources = sources
        self.order = sorted(packs)
        self.num_slots = prefetch_depth + 1
        self.on_unit = on_unit
        self.bytes_moved = 0
        self.element_size = torch.empty((), dtype=dtype).element_size()
        disk_units = [u for u in self.order if sources[u] is None]
        gpu = self.device.type == "cuda"
        self.disk = DiskReader(disk_units, packs, self.num_slots, dtype, pin=gpu) if disk_units else None
        self._gpu = None
        if gpu:
            size = max(packed_elements(packs[u]) for u in self.order)
            self._gpu = _GpuRing(size, self.num_slots, dtype, self.device)

    @contextmanager
    def resident(self, unit: int) -> Iterator[dict]:
        """The unit's tensors on the compute device, valid inside the block."""
        self.bytes_moved += packed_elements(self.packs[unit]) * self.element_size
        if self.on_unit is not None:
            self.on_unit(unit, self.bytes_moved)
        if self._gpu is None:
            slot = self.disk.take(unit)
            try:
                yield views_into(slot.flat, self.packs[unit])
            finally:
                self.disk.give_back(slot)
            return
        with self._gpu.use(unit, self) as flat:
            yield views_into(flat, self.packs[unit])

    def host_source(self, unit: int):
        """(host flat tensor, release callback) for a GPU copy of `unit`."""
        source = self.sources[unit]
        if source is not None:
            return source, lambda event: None
        slot = self.disk.take(unit)
        return slot.flat, lambda event: self.disk.give_back(slot, copied=event)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


class _GpuRing:
    """GPU staging buffers filled on a side stream; events order copies against compute."""

    def __init__(self, size: int, num_slots: int, dtype, device):
        self.buffers = [torch.empty(size, dtype=dtype, device=device) for _ in range(num_slots)]
        self.ready = [torch.cuda.Event() for _ in range(num_slots)]
        self.free = [None] * num_slots
        self.stream = torch.cuda.Stream(device=device)
        self.pending: deque[tuple[int, int]] = deque()  # (unit, slot) copies issued, not consumed
        self.next_slot = 0
        self.next_unit_pos = 0

    def _issue(self, streamer: LayerStreamer) -> None:
        unit = streamer.order[self.next_unit_pos % len(streamer.order)]
        slot = self.next_slot
        self.next_unit_pos += 1
        self.next_slot = (slot + 1) % len(self.buffers)
        host, release = streamer.host_source(unit)
        count = packed_elements(streamer.packs[unit])
        with torch.cuda.stream(self.stream):
            if self.free[slot] is not None:
                self.stream.wait_event(self.free[slot])
            self.buffers[slot][:count].copy_(host[:count], non_blocking=True)
            self.ready[slot].record(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        release(done)
        self.pending.append((unit, slot))

    @contextmanager
    def use(self, unit: int, streamer: LayerStreamer):
        while len(self.pending) < len(self.buffers):
            self._issue(streamer)
        while self.pending[0][0] != unit:  # a unit the step did not use (the head in a prefill chunk)
            _, skipped = self.pending.popleft()
            self._mark_free(skipped)
            self._issue(streamer)
        _, slot = self.pending.popleft()
        compute = torch.cuda.current_stream(self.buffers[slot].device)
        compute.wait_event(self.ready[slot])
        try:
            yield self.buffers[slot]
        finally:
            self._mark_free(slot)
            self._issue(streamer)

    def _mark_free(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.buffers[slot].device))
        self.free[slot] = event
