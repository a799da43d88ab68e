import pytest

from llmrun.errors import ContextOverflowError
from llmrun.kv.block_allocator import BlockAllocator


def test_allocation_grows_across_block_boundaries():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    alloc.add_sequence(1)
    assert alloc.grow(1, 3) == [0]
    assert alloc.grow(1, 4) == []          # still fits in block 0
    assert alloc.grow(1, 5) == [1]         # crosses into a second block
    assert alloc.block_table(1) == [0, 1]
    assert alloc.num_free_blocks == 6


def test_memory_held_exceeds_tokens_by_less_than_one_block():
    alloc = BlockAllocator(num_blocks=64, block_size=16)
    alloc.add_sequence(0)
    for num_tokens in range(1, 500):
        alloc.grow(0, num_tokens)
        held_slots = len(alloc.block_table(0)) * alloc.block_size
        assert 0 <= held_slots - num_tokens < alloc.block_size


def test_free_returns_blocks_and_sequences_do_not_share_blocks():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    alloc.add_sequence(1)
    alloc.add_sequence(2)
    alloc.grow(1, 3)
    alloc.grow(2, 4)
    assert not set(alloc.block_table(1)) & set(alloc.block_table(2))
    assert alloc.num_free_blocks == 0
    alloc.free_sequence(1)
    assert alloc.num_free_blocks == 2
    assert not alloc.has_sequence(1)


def test_refcounts_keep_shared_blocks_until_last_owner_frees():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    alloc.add_sequence(1)
    alloc.grow(1, 4)
    alloc.fork(1, 2)
    shared = alloc.block_table(1)
    assert alloc.block_table(2) == shared
    assert all(alloc.refcount(b) == 2 for b in shared)
    alloc.free_sequence(1)
    assert alloc.num_free_blocks == 2
    assert all(alloc.refcount(b) == 1 for b in shared)
    alloc.free_sequence(2)
    assert alloc.num_free_blocks == 4


def test_truncate_releases_whole_blocks_only():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    alloc.add_sequence(1)
    alloc.grow(1, 13)
    assert len(alloc.block_table(1)) == 4
    alloc.truncate(1, 5)
    assert len(alloc.block_table(1)) == 2
    assert alloc.num_tokens(1) == 5
    assert alloc.num_free_blocks == 2


def test_exhaustion_is_a_clear_error_and_changes_nothing():
    alloc = BlockAllocator(num_blocks=3, block_size=4)
    alloc.add_sequence(1)
    alloc.grow(1, 8)
    assert not alloc.can_grow(1, 13)
    with pytest.raises(ContextOverflowError, match="holds 12 tokens"):
        alloc.grow(1, 13)
    assert alloc.block_table(1) == [0, 1]
    assert alloc.num_tokens(1) == 8
    assert alloc.can_grow(1, 12)


def test_double_free_is_an_internal_error():
    alloc = BlockAllocator(num_blocks=2, block_size=2)
    alloc.add_sequence(1)
    alloc.grow(1, 2)
    alloc.free_sequence(1)
    with pytest.raises(KeyError):
        alloc.free_sequence(1)
