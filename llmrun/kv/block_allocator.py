"""BlockAllocator: pure-Python free list, refcounts, block tables and the prefix cache (no tensors)."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Hashable, Sequence

from llmrun.errors import ContextOverflowError


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The name of a full block: a digest of its parent block's name and its own tokens (vLLM's
    hash chain), so equal names mean equal tokens from the sequence's first one on."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


def chain_root(salt: Hashable) -> bytes:
    """The parent of a sequence's first block: what else the K/V depend on (a RoPE variant)."""
    return hashlib.blake2b(repr(salt).encode(), digest_size=16).digest()


class BlockAllocator:
    """Hands out fixed-size KV blocks to sequences, and keeps computed blocks for reuse.

    Each sequence owns a block table (list of block ids, in token order). A block may be shared
    by several sequences (a common prefix); it leaves the pool's use when its refcount is 0.
    A sequence holding `n` tokens holds exactly ceil(n / block_size) blocks.

    Prefix cache: a full block whose K/V are computed gets a name (`block_hash` chained from the
    sequence's first block, see `register`). A named block nobody holds stays cached on an LRU
    list; it counts as free and is reused for other tokens only when no empty block is left
    (least recently released first). `match_prefix` finds the named blocks that start a new
    token sequence; `attach` lets a sequence start from them. A named block is never written:
    sequences only write past their cached tokens, and `truncate` never leaves a shared or
    named block partly kept.
    """

    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks >= 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))      # blocks holding nothing
        self._evictable: OrderedDict[int, None] = OrderedDict()  # named, unheld: least recent first
        self._refcounts = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._num_tokens: dict[int, int] = {}
        self._names: dict[int, bytes] = {}       # block -> its name
        self._by_name: dict[bytes, int] = {}     # name -> block
        self._seq_names: dict[int, list[bytes]] = {}  # names of a sequence's first full blocks

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can take now: empty ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks nobody holds that keep their K/V for a later prefix hit."""
        return len(self._evictable)

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

    def num_named_blocks(self, seq_id: int) -> int:
        """How many of the sequence's first blocks `register` has named so far."""
        return len(self._seq_names[seq_id])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, seq_id: int | None, new_num_tokens: int) -> bool:
        """Whether a sequence (None: a new one) can grow to `new_num_tokens` tokens now."""
        held = len(self._tables.get(seq_id, [])) if seq_id is not None else 0
        return self.blocks_needed(new_num_tokens) - held <= self.num_free_blocks

    def can_start(self, prefix_blocks: Sequence[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether a sequence attached to `prefix_blocks` (from match_prefix) can grow to
        `num_tokens` tokens now and leave `reserve` blocks free (the prefix's unheld blocks stop
        counting as free)."""
        unheld = sum(1 for block in prefix_blocks if self._refcounts[block] == 0)
        return self.blocks_needed(num_tokens) - len(prefix_blocks) + reserve <= self.num_free_blocks - unheld

    def match_prefix(self, token_ids: Sequence[int], salt: Hashable) -> tuple[list[int], list[bytes]]:
        """The cached blocks holding the longest run of `token_ids`'s full blocks from the first
        one, and their names."""
        blocks, names, parent, size = [], [], chain_root(salt), self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            name = block_hash(parent, token_ids[start : start + size])
            block = self._by_name.get(name)
            if block is None:
                break
            blocks.append(block)
            names.append(name)
            parent = name
        return blocks, names

    # -- mutations -------------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        assert seq_id not in self._tables, f"sequence {seq_id} already allocated"
        self._tables[seq_id] = []
        self._num_tokens[seq_id] = 0
        self._seq_names[seq_id] = []

    def attach(self, seq_id: int, blocks: Sequence[int], names: Sequence[bytes]) -> int:
        """Start an empty sequence from cached blocks (match_prefix's); returns its tokens now."""
        assert self._num_tokens[seq_id] == 0 and not self._tables[seq_id]
        for block in blocks:
            if self._refcounts[block] == 0:
                del self._evictable[block]
            self._refcounts[block] += 1
        self._tables[seq_id] = list(blocks)
        self._seq_names[seq_id] = list(names)
        self._num_tokens[seq_id] = len(blocks) * self.block_size
        return self._num_tokens[seq_id]

    def register(self, seq_id: int, token_ids: Sequence[int], num_computed: int, salt: Hashable) -> None:
        """Name the sequence's full blocks among its first `num_computed` tokens (their K/V are
        written), so later sequences starting with the same tokens can reuse them."""
        names, table, size = self._seq_names[seq_id], self._tables[seq_id], self.block_size
        parent = names[-1] if names else chain_root(salt)
        for index in range(len(names), min(num_computed // size, len(table))):
            name = block_hash(parent, token_ids[index * size : (index + 1) * size])
            block = table[index]
            if name not in self._by_name and block not in self._names:
                self._by_name[name] = block
                self._names[block] = name
            names.append(name)
            parent = name

    def grow(self, seq_id: int, new_num_tokens: int) -> list[int]:
        """Make room for `new_num_tokens` tokens in total; returns the newly added block ids."""
        table = self._tables[seq_id]
        assert new_num_tokens >= self._num_tokens[seq_id], "sequences only grow"
        missing = self.blocks_needed(new_num_tokens) - len(table)
        if missing > self.num_free_blocks:
            raise ContextOverflowError(
                f"KV cache is full: {new_num_tokens} tokens need "
                f"{self.blocks_needed(new_num_tokens)} blocks of {self.block_size}, "
                f"only {len(table) + self.num_free_blocks} available "
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
        self._seq_names[child_id] = list(self._seq_names[parent_id])

    def truncate(self, seq_id: int, num_tokens: int) -> int:
        """Keep at most the first `num_tokens` tokens, releasing blocks no longer needed; returns
        the tokens kept. A partly kept last block will be written again, so it loses its name,
        and when another sequence holds it too it is released as well (fewer tokens are kept)."""
        table = self._tables[seq_id]
        assert num_tokens <= self._num_tokens[seq_id]
        keep = self.blocks_needed(num_tokens)
        if num_tokens % self.block_size and keep:
            last = table[keep - 1]
            if self._refcounts[last] > 1:
                keep -= 1
                num_tokens = keep * self.block_size
            elif last in self._names:
                del self._by_name[self._names.pop(last)]
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]
        del self._seq_names[seq_id][num_tokens // self.block_size :]
        self._num_tokens[seq_id] = num_tokens
        return num_tokens

    def free_sequence(self, seq_id: int) -> None:
        """Release a sequence's blocks: the last ones first, so a cached prefix outlives its tail."""
        for block in reversed(self._tables.pop(seq_id)):
            self._release(block)
        del self._num_tokens[seq_id]
        del self._seq_names[seq_id]

    def reset_prefix_cache(self) -> None:
        """Forget every block's name: cached blocks become empty ones, held ones stay as they are."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._names.clear()
        self._by_name.clear()

    # -- internals -------------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # reuse the least recently released cached block: it forgets its name
            block, _ = self._evictable.popitem(last=False)
            del self._by_name[self._names.pop(block)]
        assert self._refcounts[block] == 0
        self._refcounts[block] = 1
        return block

    def _release(self, block: int) -> None:
        assert self._refcounts[block] > 0, f"block {block} freed twice"
        self._refcounts[block] -= 1
        if self._refcounts[block] == 0:
            if block in self._names:
                self._evictable[block] = None
            else:
                self._free.append(block)
