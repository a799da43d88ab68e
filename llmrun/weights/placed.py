"""PlacedWeights: a decoder's weights laid out as a Placement says (resident, pinned CPU, disk)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from llmrun.plan.placement import Placement, Tier
from llmrun.weights.index import CheckpointIndex
from llmrun.weights.observer import NO_STEP_OBSERVER, StepObserver
from llmrun.weights.offload import offloaded
from llmrun.weights.packing import can_pack, pack_matmul_weights
from llmrun.weights.loader import PackedTensor, TensorFileReader, pack_layout, packed_elements, views_into
from llmrun.weights.streamer import LayerStreamer

HEAD = "head"


class PlacedWeights:
    """The weights provider decoders read through: embed(), layer(i), head(), globals.

    Unit ids: decoder layers are 0..L-1; the output head is unit L.
    """

    def __init__(self, decoder, index: CheckpointIndex, placement: Placement, dtype, device,
                 prefetch_depth: int = 1, on_layer: Optional[Callable[[int, int], None]] = None,
                 step_observer: StepObserver = NO_STEP_OBSERVER):
        self.device = torch.device(device)
        self.dtype = dtype
        self.element_size = torch.empty((), dtype=dtype).element_size()
        num_layers = decoder.config.num_hidden_layers
        self.head_unit = num_layers
        packs = {i: pack_layout(index, decoder.layer_layout(i)) for i in range(num_layers)}
        packs[self.head_unit] = pack_layout(index, {HEAD: (decoder.head_name(),)})
        tiers = dict(enumerate(placement.layer_tiers))
        tiers[self.head_unit] = placement.head_tier
        self.resident: dict[int, dict] = {}
        self.packed = can_pack(dtype, self.device)
        with TensorFileReader() as reader:
            self.globals = {p.key: reader.load_packed(p, dtype, self.device)
                            for p in pack_layout(index, decoder.global_layout())}
            streamed_sources = self._load_units(reader, packs, tiers, placement.compute_tier, on_layer)
            self._embed_table, self._embed_rows = self._load_embed(reader, index, decoder, placement)
        self._row_reader: Optional[TensorFileReader] = None  # reads embedding rows left on disk
        self.step_observer = step_observer
        self.streamer = None
        if streamed_sources:
            disk_units = [u for u, source in streamed_sources.items() if source is None]
            packs.update(offloaded(packs, disk_units, dtype))  # read disk layers in the run dtype
            self.streamer = LayerStreamer({u: packs[u] for u in streamed_sources}, streamed_sources,
                                          dtype, self.device, prefetch_depth)

    def _load_units(self, reader: TensorFileReader, packs: dict, tiers: dict, compute: Tier,
                    on_layer: Optional[Callable[[int, int], None]]) -> dict[int, Optional[torch.Tensor]]:
        """Load each unit where its tier says: resident units into self.resident (packed for
        oneDNN where that applies), CPU-tier units into one pinned buffer each; returns the
        streamed units' sources (that buffer, or None for a disk unit, read when it runs)."""
        streamed_sources: dict[int, Optional[torch.Tensor]] = {}
        for unit in sorted(packs):
            if tiers[unit] is compute:
                tensors = {p.key: reader.load_packed(p, self.dtype, self.device) for p in packs[unit]}
                self.resident[unit] = pack_matmul_weights(tensors) if self.packed else tensors
            elif tiers[unit] is Tier.CPU:
                streamed_sources[unit] = self._pinned_unit(reader, packs[unit])
            else:
                streamed_sources[unit] = None
            if on_layer is not None and unit < self.head_unit:
                placed = tiers[unit] is not Tier.DISK  # disk layers are read when they run
                on_layer(unit, packed_elements(packs[unit]) * self.element_size if placed else 0)
        return streamed_sources

    def _pinned_unit(self, reader: TensorFileReader, packed: list[PackedTensor]) -> torch.Tensor:
        flat = torch.empty(packed_elements(packed), dtype=self.dtype, pin_memory=True)
        for p, view in zip(packed, views_into(flat, packed).values()):
            reader.fill_packed(p, view)
        return flat

    def _load_embed(self, reader, index, decoder, placement):
        """The embedding table: resident tensor, or (for disk) the tensor info to read rows from."""
        (packed,) = pack_layout(index, {"embed": (decoder.embed_name(),)})
        if placement.embed_tier is placement.compute_tier:
            head = self.resident.get(self.head_unit, {}).get(HEAD)
            if decoder.embed_name() == decoder.head_name() and head is not None:
                if head.is_mkldnn:  # tied and packed for the head: look rows up in the file instead
                    return None, packed.parts[0]
                return head, None  # tied: the same tensor
            return reader.load_packed(packed, self.dtype, self.device), None
        if placement.embed_tier is Tier.CPU:
            return reader.load_packed(packed, self.dtype, "cpu"), None
        return None, packed.parts[0]

    def fully_resident(self) -> bool:
        """Whether every weight, embeddings included, lives on the compute device (nothing streams)."""
        table = self._embed_table
        return self.streamer is None and table is not None and table.device.type == self.device.type

    # -- the provider interface ------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [num_tokens, hidden] on the compute device."""
        if self._embed_table is not None:
            table = self._embed_table
            rows = F.embedding(input_ids.to(table.device), table)
            return rows.to(self.device, non_blocking=True)
        info = self._embed_rows  # disk: read just the rows these tokens need
        hidden = info.shape[1]
        out = torch.empty((input_ids.numel(), hidden), dtype=self.dtype)
        row_bytes = info.num_bytes // info.shape[0]
        if self._row_reader is None:  # kept open: this runs every step
            self._row_reader = TensorFileReader()
        for row, token in enumerate(input_ids.tolist()):
            start = info.start + token * row_bytes
            one = type(info)(info.name, info.file, info.dtype, (hidden,), start, start + row_bytes)
            self._row_reader.read_into(one, out[row])
        return out.to(self.device)

    @contextmanager
    def layer(self, layer_idx: int) -> Iterator[dict]:
        if self.step_observer.watches_layers:
            self.step_observer.layer(layer_idx, self.head_unit, self.streamer.bytes_moved if self.streamer else 0)
        if layer_idx in self.resident:
            yield self.resident[layer_idx]
            return
        with self.streamer.resident(layer_idx) as tensors:
            yield tensors

    @contextmanager
    def head(self) -> Iterator[torch.Tensor]:
        if self.head_unit in self.resident:
            yield self.resident[self.head_unit][HEAD]
            return
        with self.streamer.resident(self.head_unit) as tensors:
            yield tensors[HEAD]

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
        if self._row_reader is not None:
            self._row_reader.close()
            self._row_reader = None
