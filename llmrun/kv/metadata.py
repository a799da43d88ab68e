"""AttentionMetadata and the one place block tables become slot indices (sliding windows included)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence


@dataclass(frozen=True)
class SeqStep:
    """One sequence's share of a forward step: `num_new` tokens after `num_cached` cached ones.

    `seq_len` is every token the sequence has now, those a later prefill chunk will run included
    (None: just context_len); it is the length transformers' forward would see for the sequence.
    """

    block_table: Sequence[int]
    num_cached: int
    num_new: int
    seq_len: Optional[int] = None

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
    seq_lens: tuple[int, ...]             # tokens each sequence has now (see SeqStep.seq_len)
    context_slots: tuple[object, ...]     # per sequence LongTensor [num_keys]: the slots it attends to
    decode_slots: Optional[object]        # LongTensor [num_seqs, max_keys] when all decode
    decode_mask: Optional[object]         # BoolTensor [num_seqs, 1, 1, max_keys] or None
    decode_span: Optional[tuple[int, int]] = None  # one decoding sequence in contiguous slots: (start, len)
    # Per sequence BoolTensor [num_new, num_keys] where the causal rule over all of context_slots
    # does not apply (a sliding window trimmed them); empty, or None for a sequence: causal.
    context_masks: tuple[Optional[object], ...] = ()
    # Set only by static-shape decode steps (engine/graphs.py): LongTensor [num_seqs], each
    # sequence's tokens now. decode_slots then cover a whole bucket of blocks, decode_mask marks
    # the real keys, and no Python number in this metadata may depend on the step's lengths.
    decode_lens: Optional[object] = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        return self.decode_slots is not None or self.decode_span is not None

    def one_sequence_keys(self) -> Optional[tuple[int, int, Optional[object]]]:
        """One sequence's decode step: (start, length, None) when its keys sit in contiguous slots,
        (0, length, LongTensor [length] of its slots in order) when they do not (a prefix-cache hit,
        a table grown around other sequences); None for any other step."""
        if self.decode_span is not None:
            return (*self.decode_span, None)
        slots = self.decode_slots
        if (slots is None or self.decode_mask is not None or self.decode_lens is not None or slots.shape[0] != 1
                or slots.device.type != "cpu"):
            return None
        return 0, slots.shape[1], slots[0].contiguous()

    def decode_keys(self) -> Optional[list[tuple[int, int, Optional[object]]]]:
        """Every sequence's keys in a step where each decodes one token (as one_sequence_keys gives
        them: (start, length, None) in contiguous slots, or (0, length, its slots in order)), in the
        order of the step's rows; None for any other step (a prompt chunk, a static-shape step)."""
        one = self.one_sequence_keys()
        if one is not None:
            return [one]
        if (self.decode_slots is None or self.decode_lens is not None or self.decode_slots.device.type != "cpu"
                or any(n != 1 for n in self.query_lens)):
            return None
        return [(0, slots.numel(), slots.contiguous()) for slots in self.context_slots]


def token_slots(block_table: Sequence[int], block_size: int, start: int, stop: int):
    """Slot index of token positions [start, stop) of a sequence, block * block_size + offset, as a
    CPU LongTensor built from the blocks (not token by token)."""
    import torch

    first_block = start // block_size
    blocks = torch.tensor(block_table[first_block : -(-stop // block_size)], dtype=torch.long)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)  # [blocks * block_size]
    offset = start - first_block * block_size
    return slots[offset : offset + stop - start]


def contiguous_start(block_table: Sequence[int], num_tokens: int, block_size: int) -> Optional[int]:
    """The first slot when the blocks holding `num_tokens` tokens are consecutive, else None."""
    used = block_table[: -(-num_tokens // block_size)]
    if all(b == used[0] + i for i, b in enumerate(used)):
        return used[0] * block_size
    return None


def _padded_decode(context_slots: Sequence, device):
    """Decode slots padded to the longest row [num_seqs, max_keys], and the mask of real ones."""
    import torch

    lens = [slots.numel() for slots in context_slots]
    padded = torch.zeros((len(lens), max(lens)), dtype=torch.long, device=device)
    for row, slots in enumerate(context_slots):
        padded[row, : slots.numel()] = slots
    if len(set(lens)) == 1:
        return padded, None
    positions = torch.arange(max(lens), device=device)
    mask = positions[None, :] < torch.tensor(lens, device=device)[:, None]
    return padded, mask[:, None, None, :]


def build_metadata(steps: Sequence[SeqStep], block_size: int, device) -> AttentionMetadata:
    """Translate block tables into the slot tensors of one forward step."""
    import torch

    seq_lens = tuple(s.context_len if s.seq_len is None else s.seq_len for s in steps)
    if len(steps) == 1 and steps[0].num_new == 1:
        step = steps[0]
        start = contiguous_start(step.block_table, step.context_len, block_size)
        if start is not None:
            return AttentionMetadata(
                slot_mapping=torch.tensor([start + step.num_cached], dtype=torch.long, device=device),
                query_starts=(0,), query_lens=(1,), cached_lens=(step.num_cached,), seq_lens=seq_lens,
                context_slots=(), decode_slots=None, decode_mask=None, decode_span=(start, step.context_len),
            )

    new_slots, context_slots = [], []
    query_starts, start = [], 0
    for step in steps:
        slots = token_slots(step.block_table, block_size, 0, step.context_len)
        new_slots.append(slots[step.num_cached :])
        context_slots.append(slots.to(device))
        query_starts.append(start)
        start += step.num_new
    decode_slots = decode_mask = None
    if all(step.num_new == 1 for step in steps):
        decode_slots, decode_mask = _padded_decode(context_slots, device)
    return AttentionMetadata(
        slot_mapping=torch.cat(new_slots).to(device),
        query_starts=tuple(query_starts),
        query_lens=tuple(s.num_new for s in steps),
        cached_lens=tuple(s.num_cached for s in steps),
        seq_lens=seq_lens,
        context_slots=tuple(context_slots),
        decode_slots=decode_slots,
        decode_mask=decode_mask,
    )


def _window_mask(num_cached: int, num_new: int, first_key: int, window: int, device):
    """BoolTensor [num_new, num_keys]: query at num_cached + r sees key at first_key + j when
    q - window < k <= q (transformers' sliding-window rule: the last `window` positions)."""
    import torch

    queries = torch.arange(num_new, device=device)[:, None] + num_cached
    keys = torch.arange(num_cached + num_new - first_key, device=device)[None, :] + first_key
    return (keys <= queries) & (keys > queries - window)


def _key_positions(decode_slots):
    """Key positions [1, 1, 1, max_keys] for padded decode slots [num_seqs, max_keys]."""
    import torch

    return torch.arange(decode_slots.shape[1], device=decode_slots.device)[None, None, None, :]


def windowed(meta: AttentionMetadata, window: int) -> AttentionMetadata:
    """The metadata of a sliding-window layer: slots before any query's window are dropped, and
    prefill queries get band masks. Built once per step and shared by the layers with that window."""
    if meta.decode_lens is not None:  # static decode: mask by tensor, the slots stay as they are
        first_key = (meta.decode_lens - window)[:, None, None, None]  # the query is at decode_lens - 1
        keys = _key_positions(meta.decode_slots)
        return replace(meta, decode_mask=meta.decode_mask & (keys >= first_key))
    context_lens = [c + n for c, n in zip(meta.cached_lens, meta.query_lens)]
    if max(context_lens) <= window:
        return meta
    if meta.decode_span is not None:
        start, length = meta.decode_span
        return replace(meta, decode_span=(start + length - window, window))
    device = meta.slot_mapping.device
    firsts = [max(0, cached - window + 1) for cached in meta.cached_lens]
    trimmed = tuple(slots[first:] for slots, first in zip(meta.context_slots, firsts))
    if meta.decode_slots is not None:
        decode_slots, decode_mask = _padded_decode(trimmed, device)
        return replace(meta, context_slots=trimmed, decode_slots=decode_slots, decode_mask=decode_mask)
    masks = tuple(
        _window_mask(cached, new, first, window, device) if cached + new > window else None
        for cached, new, first in zip(meta.cached_lens, meta.query_lens, firsts)
    )
    return replace(meta, context_slots=trimmed, context_masks=masks)


def static_decode_metadata(block_tables, context_lens, slot_mapping, block_size: int,
                           seq_lens: Sequence[int]) -> AttentionMetadata:
    """Decode metadata computed on the device from tensors alone, so a CUDA graph can capture it
    (engine/graphs.py): block_tables [num_seqs, num_blocks] (a bucket of blocks, each row padded
    with any valid block), context_lens [num_seqs] (tokens each sequence has), slot_mapping
    [num_seqs]. `seq_lens` are Python lengths that pick the RoPE variant only (the caller keys
    its graphs by that variant); attention reads nothing but the tensors."""
    import torch

    num_seqs, num_blocks = block_tables.shape
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables[:, :, None] * block_size + offsets).reshape(num_seqs, num_blocks * block_size)
    mask = _key_positions(slots) < context_lens[:, None, None, None]  # [num_seqs, 1, 1, max_keys]
    return AttentionMetadata(
        slot_mapping=slot_mapping, query_starts=tuple(range(num_seqs)), query_lens=(1,) * num_seqs,
        cached_lens=tuple(n - 1 for n in seq_lens), seq_lens=tuple(seq_lens), context_slots=(),
        decode_slots=slots, decode_mask=mask, decode_lens=context_lens,
    )
