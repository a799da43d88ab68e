"""BlockAllocator: pure-Python free list, refcounts and per-sequence block tables (no tensors)."""

from __future__ import annotations

from collections import deque

from llmrun.errors import ContextOverflowError


class BlockAllocator:
    """Hands out fixed-size KV blocks to sequences.

    Each sequence owns a block table (list of block ids, in token order). A block may be shared
    by several sequences (a common prefix); it returns to the free list when its refcount is 0.
    A sequence holding `n` tokens holds exactly ceil(n / block_size) blocks.
    """

    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks >= 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refcounts = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._num_tokens: dict[int, int] = {}

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def num_tokens(self, seq_id: int) -> int:
        return self._num_tokens[seq_id]

    def refcount(self, block_id: int) -> int:
        return self._refcounts[block_id]

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def sequence_ids(self) -> list[int]:
        return list(self._tables)

    def wasted_slots(self, seq_id: int) -> int:
        """Slots a sequence holds beyond its tokens (always less than one block)."""
        return len(self._tables[seq_id]) * self.block_size - self._num_tokens[seq_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, seq_id: int | None, new_num_tokens: int) -> bool:
        """Whether a sequence (None: a new one) can grow to `new_num_tokens` tokens now."""
        held = len(self._tables.get(seq_id, [])) if seq_id is not None else 0
        return self.blocks_needed(new_num_tokens) - held <= len(self._free)

    # -- mutations -------------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        assert seq_id not in self._tables, f"sequence {seq_id} already allocated"
        self._tables[seq_id] = []
        self._num_tokens[seq_id] = 0

    def grow(self, seq_id: int, new_num_tokens: int) -> list[int]:
        """Make room for `new_num_tokens` tokens in total; returns the newly added block ids."""
        table = self._tables[seq_id]
        assert new_num_tokens >= self._num_tokens[seq_id], "sequences only grow"
        missing = self.blocks_needed(new_num_tokens) - len(table)
        if missing > len(self._free):
            raise ContextOverflowError(
                f"KV cache is full: {new_num_tokens} tokens need "
                f"{self.blocks_needed(new_num_tokens)} blocks of {self.block_size}, "
                f"only {len(table) + len(self._free)} available "
                f"(the cache holds {self.capacity_tokens} tokens in all; use a shorter context "
                f"or fewer sequences)"
            )
        added = [self._take() for _ in range(max(missing, 0))]
        table.extend(added)
        self._num_tokens[seq_id] = new_num_tokens
        return added

    def fork(self, parent_id: int, child_id: int) -> None:
        """Start `child_id` sharing all of the parent's blocks (copy-on-write is the caller's)."""
        assert child_id not in self._tables
        table = list(self._tables[parent_id])
        for block in table:
            self._refcounts[block] += 1
        self._tables[child_id] = table
        self._num_tokens[child_id] = self._num_tokens[parent_id]

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens, releasing blocks no longer needed."""
        table = self._tables[seq_id]
        assert num_tokens <= self._num_tokens[seq_id]
        keep = self.blocks_needed(num_tokens)
        for block in table[keep:]:
            self._release(block)
        del table[keep:]
        self._num_tokens[seq_id] = num_tokens

    def free_sequence(self, seq_id: int) -> None:
        for block in self._tables.pop(seq_id):
            self._release(block)
        del self._num_tokens[seq_id]

    # -- internals -------------------------------------------------------------------------
    def _take(self) -> int:
        block = self._free.popleft()
        assert self._refcounts[block] == 0
        self._refcounts[block] = 1
        return block

    def _release(self, block: int) -> None:
        assert self._refcounts[block] > 0, f"block {block} freed twice"
        self._refcounts[block] -= 1
        if self._refcounts[block] == 0:
            self._free.append(block)
