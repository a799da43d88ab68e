"""Staged pieces: how a streamed unit (a decoder layer, the output head) is cut for the staging slots.

A piece is what one staging slot holds: a whole layer, one of its matrices, or a run of the head's
vocabulary rows. A layer is one piece when it fits the plan's piece size; otherwise each matrix is
a piece with the tensors named after it (`qkv` with `qkv_bias`, a packed weight with its scales),
and the layer's other vectors (its norms) stay resident, since every matrix is used beside them.
A piece's tensors lie in one byte buffer at aligned offsets, each in its staged dtype (a float
tensor in the run dtype, any other as stored), so slots move bytes of any dtype as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmrun.weights.index import DTYPE_BYTES
from llmrun.weights.loader import PackedTensor, TensorFileReader, row_range, staged_tag, torch_dtype

ALIGN_BYTES = 64  # every staged tensor starts on a cache line (and on its element size)


def _aligned(num_bytes: int) -> int:
    return -(-num_bytes // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(frozen=True)
class StagedTensor:
    """One tensor of a piece: what to read, the dtype it is used in, its byte offset in the piece."""

    packed: PackedTensor
    tag: str
    offset: int

    @property
    def num_bytes(self) -> int:
        return self.packed.num_elements * DTYPE_BYTES[self.tag]


@dataclass(frozen=True)
class Piece:
    """Tensors staged together in one slot; `unit` is the layer (or the head unit) they belong to."""

    unit: int
    tensors: tuple[StagedTensor, ...]

    @property
    def num_bytes(self) -> int:
        last = self.tensors[-1]
        return _aligned(last.offset + last.num_bytes)

    @property
    def payload_bytes(self) -> int:
        """The tensors' own bytes (the plan's figure: alignment adds at most ALIGN_BYTES a tensor)."""
        return sum(t.num_bytes for t in self.tensors)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(t.packed.key for t in self.tensors)

    def views(self, buffer) -> dict:
        """The piece's tensors as views of `buffer` (uint8, at least num_bytes, on any device)."""
        return {t.packed.key: buffer[t.offset : t.offset + t.num_bytes].view(torch_dtype(t.tag)).view(t.packed.shape)
                for t in self.tensors}

    def fill(self, reader: TensorFileReader, buffer) -> None:
        """Read the piece from its files into `buffer` (CPU uint8), converting floats to the run dtype."""
        PieceReads(self, self.views(buffer)).fill(reader)


class PieceReads:
    """How a piece is read into its views of one buffer, worked out once: tensors staged as stored
    that lie back to back in one file make one run, read by one preadv into their places in the slot
    (an offload-cache unit is a single run); the others go through read_into, converted. Reading a
    streamed int4 SmolLM2 layer tensor by tensor cost ~0.4 ms of Python a layer in the reader thread,
    holding the interpreter lock the compute thread needs between its kernels."""

    def __init__(self, piece: "Piece", views: dict):
        import torch

        self.runs: list[list[tuple]] = []       # [(TensorInfo, byte memoryview of its place)]
        self.converted: list[tuple] = []        # (TensorInfo, destination tensor)
        for staged, view in zip(piece.tensors, views.values()):
            flat, offset = view.reshape(-1), 0
            for part in staged.packed.parts:
                dst = flat[offset : offset + part.num_elements]
                offset += part.num_elements
                if dst.dtype != torch_dtype(part.dtype):
                    self.converted.append((part, dst))
                    continue
                place = memoryview(dst.view(torch.uint8).numpy()).cast("B")
                last = self.runs[-1][-1][0] if self.runs else None
                if last is not None and last.file == part.file and last.end == part.start:
                    self.runs[-1].append((part, place))
                else:
                    self.runs.append([(part, place)])

    def fill(self, reader: TensorFileReader) -> None:
        for run in self.runs:
            reader.read_run(run)
        for part, dst in self.converted:
            reader.read_into(part, dst)


class ViewCache:
    """Pieces' tensors as views of staging buffers (and how they are read), made once per (piece,
    buffer) and reused: the buffers live as long as their streamer and a piece's layout never
    changes, while making a layer's ~14 views costs ~170 us (a streamed int4 SmolLM2 layer computes
    in ~200). The views' dict is shared: its readers never change it."""

    def __init__(self, pieces: list["Piece"]):
        self.pieces = pieces
        self._made: dict[tuple[int, int], dict] = {}
        self._reads: dict[tuple[int, int], PieceReads] = {}

    def views(self, index: int, buffer) -> dict:
        key = (index, buffer.data_ptr())
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = self.pieces[index].views(buffer)
        return made

    def reads(self, index: int, buffer) -> PieceReads:
        """How piece `index` is read into `buffer` (CPU), made once like its views."""
        key = (index, buffer.data_ptr())
        made = self._reads.get(key)
        if made is None:
            made = self._reads[key] = PieceReads(self.pieces[index], self.views(index, buffer))
        return made


def make_piece(unit: int, packs: list[PackedTensor], run_tag: str) -> Piece:
    """The tensors laid out one after another, each at an aligned offset."""
    staged, offset = [], 0
    for packed in packs:
        tensor = StagedTensor(packed, packed.staged_as or staged_tag(packed.parts[0].dtype, run_tag), offset)
        staged.append(tensor)
        offset = _aligned(offset + tensor.num_bytes)
    return Piece(unit, tuple(staged))


def cut_layer(unit: int, packs: list[PackedTensor], run_tag: str,
              max_bytes: int) -> tuple[list[Piece], list[PackedTensor]]:
    """(pieces in layout order, vectors to keep resident): the whole layer as one piece when it fits
    `max_bytes`, else one piece per matrix, each with the tensors whose key extends its key."""
    whole = make_piece(unit, packs, run_tag)
    if whole.payload_bytes <= max_bytes:
        return [whole], []
    matrices = [p for p in packs if len(p.shape) > 1 and not _companion(p.key, packs)]
    grouped = {m.key: [m] + [p for p in packs if p is not m and p.key.startswith(m.key + "_")] for m in matrices}
    taken = {p.key for group in grouped.values() for p in group}
    vectors = [p for p in packs if p.key not in taken]  # 1-D: every tensor of more is in a group
    return [make_piece(unit, group, run_tag) for group in grouped.values()], vectors


def _companion(key: str, packs: list[PackedTensor]) -> bool:
    """Whether `key` belongs with another matrix (`qkv_scale` with `qkv`)."""
    return any(p.key != key and len(p.shape) > 1 and key.startswith(p.key + "_") for p in packs)


def cut_rows(unit: int, packed: PackedTensor, run_tag: str, max_bytes: int) -> list[Piece]:
    """One tensor as consecutive runs of rows, each at most `max_bytes` of them (a row at least)."""
    row_bytes = make_piece(unit, [row_range(packed, 0, 1)], run_tag).tensors[0].num_bytes
    per_piece = max(1, max_bytes // row_bytes)
    num_rows = packed.shape[0]
    return [make_piece(unit, [row_range(packed, first, min(first + per_piece, num_rows))], run_tag)
            for first in range(0, num_rows, per_piece)]
