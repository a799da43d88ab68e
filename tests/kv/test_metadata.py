import torch

from llmrun.kv.metadata import SeqStep, build_metadata, token_slots


def test_token_slots_follow_the_block_table():
    # block size 4, blocks 7 then 2: positions 0-3 in block 7, 4-5 in block 2
    assert token_slots([7, 2], 4, 0, 6) == [28, 29, 30, 31, 8, 9]
    assert token_slots([7, 2], 4, 5, 6) == [9]


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
