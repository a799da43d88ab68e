"""The prefix cache in the block allocator: full blocks named by a hash chain, kept on an LRU list
while nobody holds them, never written while named or shared."""

from llmrun.kv.block_allocator import BlockAllocator

SALT = "default"


def computed(alloc: BlockAllocator, seq_id: int, tokens: list[int]) -> list[int]:
    """A sequence that has computed `tokens` (grown and registered); its block table."""
    alloc.add_sequence(seq_id)
    alloc.grow(seq_id, len(tokens))
    alloc.register(seq_id, tokens, len(tokens), SALT)
    return list(alloc.block_table(seq_id))


def test_a_later_sequence_finds_the_full_blocks_of_its_prefix_and_only_those():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    first = computed(alloc, 1, list(range(10)))            # blocks of [0-3], [4-7], and 2 tokens
    blocks, names = alloc.match_prefix(list(range(10)) + [99], SALT)
    assert blocks == first[:2] and len(names) == 2           # the partial third block is not named
    assert alloc.match_prefix([0, 1, 2, 3, 4, 5, 6, 99, 8], SALT)[0] == first[:1]  # diverges in block 2
    assert alloc.match_prefix([1, 0, 2, 3, 4, 5, 6, 7], SALT)[0] == []
    assert alloc.match_prefix(list(range(10)), "other rope table")[0] == []
    # the same tokens in block 2 after another first block are another name (a chain, not a block)
    computed(alloc, 2, [9, 9, 9, 9, 4, 5, 6, 7])
    assert alloc.match_prefix([7, 7, 7, 7, 4, 5, 6, 7], SALT)[0] == []


def test_attached_blocks_are_shared_and_released_blocks_stay_cached_until_needed():
    alloc = BlockAllocator(num_blocks=6, block_size=4)
    tokens = list(range(12))
    first = computed(alloc, 1, tokens)
    alloc.free_sequence(1)
    assert alloc.num_free_blocks == 6 and alloc.num_cached_blocks == 3
    blocks, names = alloc.match_prefix(tokens + [50, 51], SALT)
    assert blocks == first
    assert alloc.can_start(blocks, 14) and not alloc.can_start(blocks, 4 * 7)
    alloc.add_sequence(2)
    assert alloc.attach(2, blocks, names) == 12
    assert alloc.num_cached_blocks == 0 and alloc.num_free_blocks == 3
    alloc.add_sequence(3)
    assert alloc.attach(3, *alloc.match_prefix(tokens[:8], SALT)) == 8
    assert [alloc.refcount(b) for b in first] == [2, 2, 1]
    alloc.grow(2, 14)
    assert alloc.block_table(2)[3] not in first              # new tokens go to a new block
    alloc.free_sequence(2)
    alloc.free_sequence(3)
    assert alloc.num_free_blocks == 6 and alloc.num_used_blocks == 0


def test_the_least_recently_released_cached_block_is_reused_first():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    old = computed(alloc, 1, [1, 2, 3, 4])     # released first: its tail, then its head
    alloc.free_sequence(1)
    new = computed(alloc, 2, [5, 6])
    alloc.free_sequence(2)
    assert alloc.num_cached_blocks == 3
    alloc.add_sequence(3)
    taken = alloc.grow(3, 4)                   # one empty block, then the oldest cached one
    assert old[1] in taken and old[0] not in taken and new[0] not in taken
    assert alloc.match_prefix([1, 2, 3, 4, 9], SALT)[0] == [old[0]]  # the head outlived its tail
    assert alloc.match_prefix([5, 6, 9], SALT)[0] == new


def test_truncating_into_a_named_block_unnames_it_or_drops_it_when_shared():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    tokens = list(range(12))
    computed(alloc, 1, tokens)
    assert alloc.truncate(1, 6) == 6             # block 1 kept in part: it will be written again
    assert alloc.match_prefix(tokens, SALT)[0] == alloc.block_table(1)[:1]
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    computed(alloc, 2, tokens)
    alloc.add_sequence(3)
    alloc.attach(3, *alloc.match_prefix(tokens, SALT))
    shared = list(alloc.block_table(2))
    assert alloc.truncate(2, 6) == 4             # block 1 is sequence 3's too: not kept, not written
    assert alloc.block_table(2) == shared[:1]
    assert alloc.block_table(3) == shared and alloc.match_prefix(tokens, SALT)[0] == shared
    alloc.grow(2, 6)
    assert alloc.block_table(2)[1] not in shared


def test_a_kept_sequence_registers_again_after_truncation():
    alloc = BlockAllocator(num_blocks=8, block_size=2)
    computed(alloc, 1, [1, 2, 3, 4])
    alloc.truncate(1, 2)
    alloc.grow(1, 4)
    alloc.register(1, [1, 2, 7, 8], 4, SALT)
    assert alloc.match_prefix([1, 2, 7, 8, 0], SALT)[0] == alloc.block_table(1)


def test_resetting_the_prefix_cache_empties_the_cached_blocks():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    computed(alloc, 1, [1, 2, 3, 4])
    computed(alloc, 2, [5, 6])
    alloc.free_sequence(1)
    alloc.reset_prefix_cache()
    assert alloc.num_cached_blocks == 0 and alloc.num_free_blocks == 3
    assert alloc.match_prefix([1, 2, 3, 4, 0], SALT)[0] == [] and alloc.match_prefix([5, 6, 0], SALT)[0] == []
    alloc.free_sequence(2)
    assert alloc.num_free_blocks == 4
