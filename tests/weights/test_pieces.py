"""Staged pieces on real checkpoint files: layers cut matrix by matrix, the head in runs of rows,
tensors of any dtype staged as they are (weights/pieces.py), and the streamer's order contract."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmrun.engine.build import build_engine
from llmrun.weights.index import build_index
from llmrun.weights.loader import TensorFileReader, pack_layout, row_range
from llmrun.weights.pieces import ALIGN_BYTES, cut_layer, cut_rows, make_piece
from llmrun.weights.streamer import StagedLayer
from tests.checkpoints import llama_config, qwen2_config, save_checkpoint
from tests.placements import placement_options

P = "model.layers.1."
LAYOUT = {  # as the Llama-family decoders fuse a layer, with Qwen2's q/k/v biases
    "input_norm": (P + "input_layernorm.weight",),
    "qkv": tuple(P + f"self_attn.{x}_proj.weight" for x in "qkv"),
    "o": (P + "self_attn.o_proj.weight",),
    "post_norm": (P + "post_attention_layernorm.weight",),
    "gate_up": (P + "mlp.gate_proj.weight", P + "mlp.up_proj.weight"),
    "down": (P + "mlp.down_proj.weight",),
    "qkv_bias": tuple(P + f"self_attn.{x}_proj.bias" for x in "qkv"),
}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    folder = save_checkpoint(tmp_path_factory.mktemp("qwen2") / "qwen2", qwen2_config(), seed=2)
    return folder, build_index(folder), load_file(folder / "model.safetensors")


def expected(tensors, key, dtype=torch.float32):
    return torch.cat([tensors[name] for name in LAYOUT[key]]).to(dtype)


def read(piece):
    buffer = torch.empty(piece.num_bytes, dtype=torch.uint8)
    with TensorFileReader() as reader:
        piece.fill(reader, buffer)
    return piece.views(buffer)


def test_a_layer_that_fits_is_one_piece_holding_every_tensor(qwen2):
    folder, index, tensors = qwen2
    packs = pack_layout(index, LAYOUT)
    pieces, vectors = cut_layer(1, packs, "BF16", sum(p.num_elements for p in packs) * 2)
    assert len(pieces) == 1 and vectors == []
    views = read(pieces[0])
    assert list(views) == list(LAYOUT)
    for key in LAYOUT:
        assert torch.equal(views[key], expected(tensors, key, torch.bfloat16)), key
        assert views[key].data_ptr() % ALIGN_BYTES == 0


def test_a_larger_layer_is_cut_matrix_by_matrix_with_its_biases_and_norms_left_out(qwen2):
    folder, index, tensors = qwen2
    packs = pack_layout(index, LAYOUT)
    largest = max(p.num_elements for p in packs) * 4
    pieces, vectors = cut_layer(1, packs, "F32", largest + 1)
    assert [piece.keys for piece in pieces] == [("qkv", "qkv_bias"), ("o",), ("gate_up",), ("down",)]
    assert [v.key for v in vectors] == ["input_norm", "post_norm"]
    assert max(piece.payload_bytes for piece in pieces) <= largest + 1 < sum(p.num_elements for p in packs) * 4
    for piece in pieces:
        for key, view in read(piece).items():
            assert torch.equal(view, expected(tensors, key)), key


def test_rows_across_the_parts_of_a_fused_tensor(qwen2):
    folder, index, tensors = qwen2
    (qkv,) = pack_layout(index, {"qkv": LAYOUT["qkv"]})
    q_rows = tensors[LAYOUT["qkv"][0]].shape[0]
    part = row_range(qkv, q_rows - 5, q_rows + 7)  # the last rows of q, the first of k
    out = torch.empty(part.shape)
    with TensorFileReader() as reader:
        reader.fill_packed(part, out)
    assert len(part.parts) == 2
    assert torch.equal(out, expected(tensors, "qkv")[q_rows - 5 : q_rows + 7])


@pytest.mark.parametrize("max_bytes", [1, 64 * 4 * 7 + 3, 10**9])
def test_the_head_in_runs_of_rows_that_join_to_the_whole(qwen2, max_bytes):
    folder, index, tensors = qwen2
    (head,) = pack_layout(index, {"head": ("model.embed_tokens.weight",)})
    pieces = cut_rows(3, head, "F32", max_bytes)
    row_bytes = head.shape[1] * 4
    assert all(p.payload_bytes <= max(max_bytes, row_bytes) for p in pieces)
    assert len(pieces) == -(-head.shape[0] // max(1, max_bytes // row_bytes))
    joined = torch.cat([read(p)["head"] for p in pieces])
    assert torch.equal(joined, tensors["model.embed_tokens.weight"])


def test_tensors_that_are_not_floats_are_staged_as_stored(tmp_path):
    packed_weight = torch.randint(-128, 128, (6, 10), dtype=torch.int8)
    scales = torch.rand(6, dtype=torch.float32)
    save_file({"w.qweight": packed_weight, "w.scales": scales}, tmp_path / "model.safetensors")
    index = build_index(tmp_path)
    piece = make_piece(0, pack_layout(index, {"w": ("w.qweight",), "w_scales": ("w.scales",)}), "BF16")
    views = read(piece)
    assert views["w"].dtype is torch.int8 and torch.equal(views["w"], packed_weight)
    assert views["w_scales"].dtype is torch.bfloat16 and torch.equal(views["w_scales"], scales.to(torch.bfloat16))


@pytest.mark.parametrize("most_per_call", [None, 100])
def test_tensors_back_to_back_in_a_file_are_read_in_one_run_even_when_reads_come_short(tmp_path, monkeypatch,
                                                                                      most_per_call):
    """One preadv fills the places of tensors that follow each other in the file (a bfloat16 one
    converts on its own); a read that returns fewer bytes is finished tensor by tensor."""
    import os

    from llmrun.weights import loader
    from llmrun.weights.pieces import PieceReads

    stored = {"a": torch.randn(5, 8), "b": torch.randn(3, 8), "c": torch.randn(7, 16),
              "d": torch.randn(4, 8, dtype=torch.bfloat16)}
    save_file(stored, tmp_path / "model.safetensors")
    index = build_index(tmp_path)
    piece = make_piece(0, pack_layout(index, {"ab": ("a", "b"), "c": ("c",), "d": ("d",)}), "F32")
    if most_per_call is not None:
        real = os.preadv

        def short(fd, views, offset):  # at most `most_per_call` bytes a call, into the first view
            return real(fd, [views[0][:most_per_call]], offset)

        monkeypatch.setattr(loader.os, "preadv", short)
    buffer = torch.empty(piece.num_bytes, dtype=torch.uint8)
    reads = PieceReads(piece, piece.views(buffer))
    assert [[info.name for info, _ in run] for run in reads.runs] == [["a", "b", "c"]]
    assert [info.name for info, _ in reads.converted] == ["d"]
    with TensorFileReader() as reader:
        reads.fill(reader)
        assert reader.bytes_read == sum(index[name].num_bytes for name in stored)
    views = piece.views(buffer)
    assert torch.equal(views["ab"], torch.cat([stored["a"], stored["b"]])) and torch.equal(views["c"], stored["c"])
    assert torch.equal(views["d"], stored["d"].float())


@pytest.fixture(scope="module")
def floor_engine(tmp_path_factory):
    folder = save_checkpoint(tmp_path_factory.mktemp("llama") / "llama", llama_config(), seed=4)
    engine = build_engine(folder, placement_options("disk-floor", folder))
    yield engine, load_file(folder / "model.safetensors")
    engine.close()


def test_at_the_floor_slots_hold_a_matrix_not_a_layer(floor_engine):
    engine, _ = floor_engine
    placement, streamer = engine.plan.placement, engine.weights.streamer
    staging = next(r for r in placement.reservations if r.name == "staging")
    slots = [slot.flat.numel() for slot in streamer.disk.slots]
    assert len(slots) == 2 and max(slots) <= placement.staging_piece_bytes + 4 * ALIGN_BYTES
    assert sum(slots) <= staging.num_bytes + 8 * ALIGN_BYTES
    assert placement.staging_piece_bytes < max(placement.sizes.layer_bytes) / 2


def test_a_streamed_layer_gives_its_matrices_in_layout_order_and_refuses_going_back(floor_engine):
    engine, tensors = floor_engine
    weights = engine.weights
    layer = next(i for i in weights.unit_pieces if i != weights.head_unit)
    p = f"model.layers.{layer}."
    with weights.layer(layer) as w:
        assert isinstance(w, StagedLayer) and "qkv" in w and "o" in w
        assert torch.equal(w["input_norm"], tensors[p + "input_layernorm.weight"])
        qkv = torch.cat([tensors[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(w["qkv"], qkv)
        assert torch.equal(w["o"], tensors[p + "self_attn.o_proj.weight"])
        assert torch.equal(w["post_norm"], tensors[p + "post_attention_layernorm.weight"])  # resident: any time
        with pytest.raises(RuntimeError, match="layout's order"):
            w["qkv"]
        assert torch.equal(w["down"], tensors[p + "mlp.down_proj.weight"])  # gate_up skipped, released
    with weights.layer(layer) as w:  # the cycle goes on: the same layer's next turn comes round again
        assert torch.equal(w["o"], tensors[p + "self_attn.o_proj.weight"])


def test_a_piece_s_views_of_a_buffer_are_made_once_and_show_what_it_holds_now(qwen2):
    from llmrun.weights.pieces import ViewCache

    folder, index, tensors = qwen2
    pieces, _ = cut_layer(1, pack_layout(index, LAYOUT), "BF16", 10**9)
    cache = ViewCache(pieces)
    buffers = [torch.zeros(pieces[0].num_bytes, dtype=torch.uint8) for _ in range(2)]
    first = cache.views(0, buffers[0])
    assert cache.views(0, buffers[0]) is first and cache.views(0, buffers[1]) is not first
    assert all(v.untyped_storage().data_ptr() == buffers[0].data_ptr() for v in first.values())
    with TensorFileReader() as reader:
        cache.reads(0, buffers[0]).fill(reader)  # filled through the cached views, read through them again
    for key in LAYOUT:
        assert torch.equal(cache.views(0, buffers[0])[key], expected(tensors, key, torch.bfloat16)), key
    assert not cache.views(0, buffers[1])["qkv"].any()  # the other buffer's views: its own bytes
