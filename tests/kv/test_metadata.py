import torch

from llmrun.kv.metadata import SeqStep, build_metadata, token_slots, windowed


def test_token_slots_follow_the_block_table():
    # block size 4, blocks 7 then 2: positions 0-3 in block 7, 4-5 in block 2
    assert token_slots([7, 2], 4, 0, 6).tolist() == [28, 29, 30, 31, 8, 9]
    assert token_slots([7, 2], 4, 5, 6).tolist() == [9]


def test_prefill_metadata_maps_new_tokens_after_cached_ones():
    meta = build_metadata([SeqStep([3], 0, 3), SeqStep([1, 5], 4, 2)], 4, "cpu")
    assert meta.slot_mapping.tolist() == [12, 13, 14, 20, 21]
    assert meta.query_starts == (0, 3)
    assert meta.cached_lens == (0, 4)
    assert [s.tolist() for s in meta.context_slots] == [[12, 13, 14], [4, 5, 6, 7, 20, 21]]
    assert not meta.is_decode


def test_decode_metadata_pads_and_masks_shorter_sequences():
    meta = build_metadata([SeqStep([0], 2, 1), SeqStep([1, 2], 4, 1)], 4, "cpu")
    assert meta.is_decode
    assert meta.decode_slots.shape == (2, 5)
    assert meta.decode_mask[:, 0, 0, :].tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
    ]
    assert meta.slot_mapping.tolist() == [2, 8]
    same_len = build_metadata([SeqStep([0], 2, 1), SeqStep([1], 2, 1)], 4, "cpu")
    assert same_len.decode_mask is None
    assert torch.equal(same_len.decode_slots, torch.tensor([[0, 1, 2], [4, 5, 6]]))


def test_window_drops_slots_before_every_query_window():
    # one sequence decoding its 7th token in contiguous slots 8..14: a window of 3 reads 12..14
    meta = build_metadata([SeqStep([2, 3], 6, 1)], 4, "cpu")
    assert windowed(meta, 3).decode_span == (12, 3)
    assert windowed(meta, 7) is meta  # the whole context fits: nothing to restrict
    # two decoding sequences (7 and 3 tokens): each keeps its last 3 slots at most
    both = windowed(build_metadata([SeqStep([2, 0], 6, 1), SeqStep([5], 2, 1)], 4, "cpu"), 3)
    assert both.decode_slots.tolist() == [[0, 1, 2], [20, 21, 22]]  # positions 4-6 sit in block 0
    assert both.decode_mask is None


def test_window_masks_prefill_queries_to_their_band():
    # 2 cached + 3 new tokens, window 2: the first query (position 2) needs keys from position 1
    meta = windowed(build_metadata([SeqStep([0, 1], 2, 3)], 4, "cpu"), 2)
    assert meta.context_slots[0].tolist() == [1, 2, 3, 4]
    assert meta.context_masks[0].int().tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert meta.seq_lens == (5,)
