"""AttentionMetadata and the one function that turns block tables into slot indices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class SeqStep:
    """One sequence's share of a forward step: `num_new` tokens after `num_cached` cached ones."""

    block_table: Sequence[int]
    num_cached: int
    num_new: int

    @property
    def context_len(self) -> int:
        return self.num_cached + self.num_new


@dataclass(frozen=True)
class AttentionMetadata:
    """What attention needs to find a step's K/V in the pools; passed explicitly to the model.

    Tokens of all sequences are laid out flat, sequence after sequence.
    """

    slot_mapping: object                  # LongTensor [num_tokens]: where each new K/V goes
    query_starts: tuple[int, ...]         # first flat token of each sequence
    query_lens: tuple[int, ...]           # new tokens per sequence
    cached_lens: tuple[int, ...]          # tokens already cached per sequence
    context_slots: tuple[object, ...]     # per sequence LongTensor [context_len]: all its slots
    decode_slots: Optional[object]        # LongTensor [num_seqs, max_context] when all decode
    decode_mask: Optional[object]         # BoolTensor [num_seqs, 1, 1, max_context] or None
    decode_span: Optional[tuple[int, int]] = None  # one decoding sequence in contiguous slots: (start, len)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        return self.decode_slots is not None or self.decode_span is not None


def token_slots(block_table: Sequence[int], block_size: int, start: int, stop: int) -> list[int]:
    """Slot index of token positions [start, stop) of a sequence: block * block_size + offset."""
    return [block_table[pos // block_size] * block_size + pos % block_size for pos in range(start, stop)]


def contiguous_start(block_table: Sequence[int], num_tokens: int, block_size: int) -> Optional[int]:
    """The first slot when the blocks holding `num_tokens` tokens are consecutive, else None."""
    used = block_table[: -(-num_tokens // block_size)]
    if all(b == used[0] + i for i, b in enumerate(used)):
        return used[0] * block_size
    return None


def build_metadata(steps: Sequence[SeqStep], block_size: int, device) -> AttentionMetadata:
    """Translate block tables into the slot tensors of one forward step."""
    import torch

    if len(steps) == 1 and steps[0].num_new == 1:
        step = steps[0]
        start = contiguous_start(step.block_table, step.context_len, block_size)
        if start is not None:
            return AttentionMetadata(
                slot_mapping=torch.tensor([start + step.num_cached], dtype=torch.long, device=device),
                query_starts=(0,), query_lens=(1,), cached_lens=(step.num_cached,), context_slots=(),
                decode_slots=None, decode_mask=None, decode_span=(start, step.context_len),
            )

    new_slots: list[int] = []
    context_slots = []
    query_starts, start = [], 0
    for step in steps:
        slots = token_slots(step.block_table, block_size, 0, step.context_len)
        new_slots.extend(slots[step.num_cached:])
        context_slots.append(torch.tensor(slots, dtype=torch.long, device=device))
        query_starts.append(start)
        start += step.num_new
    decode_slots = decode_mask = None
    if all(step.num_new == 1 for step in steps):
        max_context = max(step.context_len for step in steps)
        padded = torch.zeros((len(steps), max_context), dtype=torch.long, device=device)
        for row, slots in enumerate(context_slots):
            padded[row, : slots.numel()] = slots
        decode_slots = padded
        if any(step.context_len != max_context for step in steps):
            lens = torch.tensor([s.context_len for s in steps], device=device)
            positions = torch.arange(max_context, device=device)
            decode_mask = (positions[None, :] < lens[:, None])[:, None, None, :]
    return AttentionMetadata(
        slot_mapping=torch.tensor(new_slots, dtype=torch.long, device=device),
        query_starts=tuple(query_starts),
        query_lens=tuple(s.num_new for s in steps),
        cached_lens=tuple(s.num_cached for s in steps),
        context_slots=tuple(context_slots),
        decode_slots=decode_slots,
        decode_mask=decode_mask,
    )
