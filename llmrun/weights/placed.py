"""PlacedWeights: a decoder's weights laid out as a Placement says (resident, pinned CPU, disk)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from llmrun.errors import UsageError
from llmrun.plan.tiers import Placement, Tier
from llmrun.quant.format import QuantWeight, dequantize_rows
from llmrun.weights.index import CheckpointIndex
from llmrun.weights.observer import NO_STEP_OBSERVER, StepObserver
from llmrun.weights.offload import kept_converted, offloaded
from llmrun.weights.packing import can_pack, pack_weight
from llmrun.weights.loader import (FLOAT_TAGS, PackedTensor, TensorFileReader, dtype_tag, pack_layout, row_range,
                                   staged_tag, torch_dtype)
from llmrun.weights.pieces import Piece, cut_layer, cut_rows
from llmrun.weights.quantized import QuantLayout, UnitParts, quant_table
from llmrun.weights.streamer import LayerStreamer, StagedLayer

HEAD = "head"
# A resident head is packed (and kept, and multiplied) in runs of this many vocabulary rows: packing a
# weight holds it twice, and a whole head beside the rest of a tight budget went past it (SmolLM2 int4
# under 150 MB: 157 MB at load, the plan 148).
HEAD_PACK_ROWS = 4096


class PlacedWeights:
    """The weights provider decoders read through: embed(), layer(i), head_chunks(), globals.

    Unit ids: decoder layers are 0..L-1; the output head is unit L. A streamed unit is staged in
    pieces (weights/pieces.py) no larger than the plan's `staging_piece_bytes`. A quantized
    checkpoint's packed parts are staged like any tensor and handed to layers as QuantWeights
    (weights/quantized.py), which the kernel set runs.
    """

    def __init__(self, decoder, index: CheckpointIndex, placement: Placement, dtype, device,
                 prefetch_depth: int = 1, on_layer: Optional[Callable[[int, int], None]] = None,
                 step_observer: StepObserver = NO_STEP_OBSERVER):
        self.device = torch.device(device)
        self.dtype = dtype
        self.run_tag = dtype_tag(dtype)
        num_layers = decoder.config.num_hidden_layers
        self.head_unit = num_layers
        self.quant = QuantLayout(index)  # no formats: a float checkpoint
        index = self.quant.byte_index
        layouts = {i: decoder.layer_layout(i) for i in range(num_layers)}
        layouts[self.head_unit] = {HEAD: (decoder.head_name(),)}
        staged = {unit: self.quant.unit(layout) for unit, layout in layouts.items()}
        self.unit_parts: dict[int, UnitParts] = {unit: parts for unit, (_, parts) in staged.items()}
        packs = {unit: pack_layout(index, layout) for unit, (layout, _) in staged.items()}
        tiers = dict(enumerate(placement.layer_tiers))
        tiers[self.head_unit] = placement.head_tier
        for unit, unit_packs in packs.items():  # streamed compressed units: their scales staged as float32
            if tiers[unit] is not placement.compute_tier and self.unit_parts[unit]:
                packs[unit] = self.quant.streamed(unit_packs)
        self.resident: dict[int, dict] = {}
        self.packed = can_pack(dtype, self.device)
        self.unit_pieces: dict[int, list[int]] = {}  # a streamed unit's pieces, by index in the cycle
        self.vectors: dict[int, dict] = {}  # resident norms of layers streamed matrix by matrix
        self._assembled_views: dict[int, tuple[dict, dict]] = {}  # id(staged views) -> (them, assembled)
        self.streamer = None
        with TensorFileReader() as reader:
            self.globals = {p.key: self._load(reader, p) for p in pack_layout(index, decoder.global_layout())}
            source = dict(packs)  # the checkpoint's own tensors: the offload cache's key
            resident = [unit for unit in packs if tiers[unit] is placement.compute_tier]
            packs.update(kept_converted(source, resident, dtype))  # read back in the run dtype next time
            streamed = self._load_resident(reader, packs, tiers, placement.compute_tier, on_layer)
            self._embed_table, self._embed_rows = self._load_embed(reader, index, decoder, placement)
            if streamed:
                disk_units = [u for u in streamed if tiers[u] is Tier.DISK]
                packs.update(offloaded(source, disk_units, dtype))  # read disk layers in the run dtype
                pieces, sources = self._cut(reader, packs, streamed, tiers, placement.staging_piece_bytes)
                self.streamer = LayerStreamer(pieces, sources, self.device, prefetch_depth)
        self._row_reader: Optional[TensorFileReader] = None  # reads embedding rows left on disk
        self.step_observer = step_observer

    def _load(self, reader: TensorFileReader, packed: PackedTensor, device=None) -> torch.Tensor:
        dtype = torch_dtype(staged_tag(packed.parts[0].dtype, self.run_tag))
        return reader.load_packed(packed, dtype, self.device if device is None else device)

    def _load_resident(self, reader: TensorFileReader, packs: dict, tiers: dict, compute: Tier,
                       on_layer: Optional[Callable[[int, int], None]]) -> list[int]:
        """Load the units of the compute tier into self.resident (packed for oneDNN where that
        applies); returns the streamed units, in order."""
        streamed = []
        staging = _Staging()
        for unit in sorted(packs):
            if tiers[unit] is compute:
                if self.packed:
                    self.resident[unit] = self._load_packed(reader, packs[unit], self.unit_parts[unit], staging)
                else:
                    self.resident[unit] = self.unit_parts[unit].assemble({p.key: self._load(reader, p)
                                                                          for p in packs[unit]})
            else:
                streamed.append(unit)
            if on_layer is not None and unit < self.head_unit:
                placed = tiers[unit] is not Tier.DISK  # disk layers are read when they run
                on_layer(unit, sum(p.num_elements for p in packs[unit]) * self.dtype.itemsize if placed else 0)
        return streamed

    def _load_packed(self, reader: TensorFileReader, packs: list[PackedTensor], parts: UnitParts,
                     staging: "_Staging") -> dict:
        """A resident unit with its matmul weights packed for oneDNN. Each weight is read into one
        reused staging buffer and packed from there (a fresh buffer per weight costs a page fault
        per 4 KiB); a weight stored as one tensor in the run dtype (the offload cache's converted
        copies) is packed straight from a mapping of its file, with no copy at all."""
        tensors = {}
        for packed in packs:
            if len(packed.shape) == 2 and packed.key not in parts.staged and packed.parts[0].dtype in FLOAT_TAGS:
                if packed.key != HEAD or packed.shape[0] <= HEAD_PACK_ROWS:
                    tensors[packed.key] = self._packed_weight(reader, packed, staging)
                else:  # packing holds its source and its result at once: the head a run of rows at a time
                    rows = packed.shape[0]
                    tensors[packed.key] = tuple(
                        self._packed_weight(reader, row_range(packed, first, min(first + HEAD_PACK_ROWS, rows)), staging)
                        for first in range(0, rows, HEAD_PACK_ROWS))
            else:
                tensors[packed.key] = self._load(reader, packed)
        return parts.assemble(tensors)

    def _packed_weight(self, reader: TensorFileReader, packed: PackedTensor, staging: "_Staging") -> torch.Tensor:
        """One weight packed for oneDNN, from a mapping of its file (then its pages dropped again) or
        from the staging buffer."""
        view = None
        if len(packed.parts) == 1 and packed.parts[0].dtype == self.run_tag:
            try:  # stored as it runs: packed straight from the file
                view = reader.mapped(packed.parts[0])
            except (OSError, ValueError):  # a file system without mappings: read it
                pass
        mapped = view is not None
        if view is None:
            view = staging.view(packed.shape, self.dtype)
            reader.fill_packed(packed, view)
        weight = pack_weight(view)
        weight = weight.clone() if weight is view else weight  # never the buffer itself
        if mapped:
            reader.drop_mapped(packed.parts[0])  # the file's pages leave RSS: only the packed copy stays
        return weight

    def _cut(self, reader: TensorFileReader, packs: dict, streamed: list[int], tiers: dict,
             piece_bytes: int) -> tuple[list[Piece], list[Optional[torch.Tensor]]]:
        """Streamed units as pieces in cycle order, with their sources: for a CPU-tier unit its
        pieces' bytes in one pinned buffer, for a disk unit None (read when it runs)."""
        pieces: list[Piece] = []
        sources: list[Optional[torch.Tensor]] = []
        for unit in streamed:
            if unit == self.head_unit:
                if self.unit_parts[unit]:
                    raise UsageError("a quantized output head is not streamed yet: give the model room to keep "
                                     "it resident (a larger --cpu-mem or --gpu-mem)")
                unit_pieces = cut_rows(unit, packs[unit][0], self.run_tag, piece_bytes)
            else:
                unit_pieces, vectors = cut_layer(unit, packs[unit], self.run_tag, piece_bytes)
                if vectors:
                    self.vectors[unit] = {p.key: self._load(reader, p) for p in vectors}
            self.unit_pieces[unit] = list(range(len(pieces), len(pieces) + len(unit_pieces)))
            pieces += unit_pieces
            sources += self._pinned(reader, unit_pieces) if tiers[unit] is Tier.CPU else [None] * len(unit_pieces)
        return pieces, sources

    def _pinned(self, reader: TensorFileReader, unit_pieces: list[Piece]) -> list[torch.Tensor]:
        """One pinned buffer holding the unit's pieces one after another; a view of it per piece."""
        flat = torch.empty(sum(p.num_bytes for p in unit_pieces), dtype=torch.uint8, pin_memory=True)
        views, offset = [], 0
        for piece in unit_pieces:
            view = flat[offset : offset + piece.num_bytes]
            piece.fill(reader, view)
            views.append(view)
            offset += piece.num_bytes
        return views

    def _load_embed(self, reader, index, decoder, placement):
        """The embedding table: resident tensor, or (for disk) the packed tensor to read rows from."""
        head = self.resident.get(self.head_unit, {}).get(HEAD)
        tied = decoder.embed_name() == decoder.head_name()
        if decoder.embed_name() in self.quant.formats:  # stored compressed: rows dequantized when looked up
            if tied and isinstance(head, QuantWeight):
                return head, None  # the resident head's own rows
            table = quant_table(self.quant, reader, decoder.embed_name())
            return table.to(self.device if placement.embed_tier is placement.compute_tier else "cpu"), None
        (packed,) = pack_layout(index, {"embed": (decoder.embed_name(),)})
        if placement.embed_tier is placement.compute_tier:
            if tied and head is not None:
                if isinstance(head, tuple) or head.is_mkldnn:  # tied, packed for the head: rows from the file
                    return None, packed
                return head, None  # tied: the same tensor
            return self._load(reader, packed), None
        if placement.embed_tier is Tier.CPU:
            return self._load(reader, packed, "cpu"), None
        return None, packed

    def fully_resident(self) -> bool:
        """Whether every weight, embeddings included, lives on the compute device (nothing streams)."""
        table = self._embed_table
        table = table.qweight if isinstance(table, QuantWeight) else table
        return self.streamer is None and table is not None and table.device.type == self.device.type

    # -- the provider interface ------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [num_tokens, hidden] on the compute device."""
        if self._embed_table is not None:
            table = self._embed_table
            if isinstance(table, QuantWeight):
                return dequantize_rows(table, input_ids.reshape(-1)).to(self.device, self.dtype, non_blocking=True)
            rows = F.embedding(input_ids.to(table.device), table)
            return rows.to(self.device, non_blocking=True)
        packed = self._embed_rows  # not resident: read just the rows of these tokens
        out = torch.empty((input_ids.numel(), packed.shape[1]), dtype=self.dtype)
        if self._row_reader is None:  # kept open: this runs every step
            self._row_reader = TensorFileReader()
        for row, token in enumerate(input_ids.tolist()):
            self._row_reader.fill_packed(row_range(packed, token, token + 1), out[row : row + 1])
        return out.to(self.device)

    @property
    def disk_reads(self) -> Optional[str]:
        """How layers streamed from disk reach the compute (LayerStreamer.disk_reads); None where
        nothing streams."""
        return None if self.streamer is None else self.streamer.disk_reads

    @property
    def stages_matrices(self) -> bool:
        """Whether some layer streams matrix by matrix (a StagedLayer: each matrix readable once)."""
        return bool(self.vectors)

    @contextmanager
    def layer(self, layer_idx: int) -> Iterator[Mapping]:
        """The layer's tensors by layout key: a dict when resident or staged whole, a StagedLayer
        (one matrix at a time, in layout order) when it streams matrix by matrix."""
        if self.step_observer.watches_layers:
            self.step_observer.layer(layer_idx, self.head_unit, self.streamer.bytes_moved if self.streamer else 0)
        if layer_idx in self.resident:
            yield self.resident[layer_idx]
            return
        pieces = self.unit_pieces[layer_idx]
        if layer_idx not in self.vectors:
            with self.streamer.staged(pieces[0]) as tensors:
                yield self._assembled(layer_idx, tensors)
            return
        staged = StagedLayer(self.streamer, pieces, self.vectors[layer_idx], self.unit_parts[layer_idx])
        try:
            yield staged
        finally:
            staged.release()

    def _assembled(self, unit: int, tensors: dict) -> dict:
        """A unit staged whole, its compressed weights put together. `tensors` are the streamer's
        views of one slot, the same dict each time that slot holds this unit (ViewCache), so where
        every QuantWeight is made of those views alone (scales staged as float32, one format a key)
        the result is made once and given again (~200 us a layer and step; the QuantWeights' C
        structures are then reused too); else (two-level scales expanded, formats stacked) each time."""
        parts = self.unit_parts[unit]
        made = self._assembled_views.get(id(tensors))
        if made is not None and made[0] is tensors:
            return made[1]
        out = parts.assemble(tensors)
        views = {id(t) for t in tensors.values()}
        if all(id(t) in views for qw in out.values() if isinstance(qw, QuantWeight)
               for t in (qw.qweight, qw.scales, qw.mins) if t is not None):
            self._assembled_views[id(tensors)] = (tensors, out)  # (tensors held: its id stays its own)
        return out

    def head_chunks(self) -> Iterator[torch.Tensor]:
        """The output head [vocab rows, hidden] in vocabulary order: whole when resident, else its
        runs of rows as they arrive, each valid until the next is asked for."""
        if self.head_unit in self.resident:
            head = self.resident[self.head_unit][HEAD]
            yield from head if isinstance(head, tuple) else (head,)
            return
        for index in self.unit_pieces[self.head_unit]:
            with self.streamer.staged(index) as tensors:
                yield tensors[HEAD]

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
        if self._row_reader is not None:
            self._row_reader.close()
            self._row_reader = None


class _Staging:
    """One CPU buffer reused for every weight read before packing, grown to the largest."""

    def __init__(self):
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def view(self, shape: tuple[int, ...], dtype) -> torch.Tensor:
        size = math.prod(shape) * dtype.itemsize
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=torch.uint8)
        return self._buffer[:size].view(dtype).view(shape)
