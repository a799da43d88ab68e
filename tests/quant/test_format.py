"""The quantized-weight format: int4 packing, the reference dequantize, the safetensors form (one- and
two-level scales), stacking mixed formats without loss, and every inconsistency of a metadata block."""

import json

import pytest
import torch
from safetensors.torch import save_file

from llmrun.errors import InvalidModelError
from llmrun.quant.format import (
    QuantWeight, chunk_rows, concat_quant, dequantize, pack_int4, row_slices, unpack_int4,
)
from llmrun.quant.stored import (
    METADATA_KEY, QuantMetadata, TensorFormat, TwoLevel, load_quantized, save_quantized, stored_tensors, stored_two_level,
)


def int4_weight(out=4, inp=64, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, inp), dtype=torch.uint8, generator=g)
    scales = torch.rand(out, inp // group, generator=g) + 0.1
    mins = -torch.rand(out, inp // group, generator=g)
    return QuantWeight(4, group, out, inp, pack_int4(q), scales, mins), q


def test_int4_nibbles_low_first():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[1 | (2 << 4), 15]]
    assert torch.equal(unpack_int4(packed), q)


def test_dequantize_is_q_times_scale_plus_min_per_group():
    qw, q = int4_weight()
    w = dequantize(qw)
    for row, col in ((0, 0), (1, 31), (2, 32), (3, 63)):
        group = col // 32
        assert w[row, col] == q[row, col].float() * qw.scales[row, group] + qw.mins[row, group]


@pytest.mark.parametrize("bits", [4, 8])
def test_a_weight_dequantized_in_pieces_is_the_whole_of_it(bits):
    """row_slices / dequantize(out=): the same values as dequantize of the whole weight, for a weight of
    several pieces with a last one cut short; the reference matmul, which goes piece by piece (so no
    float32 copy of a whole output head is ever held), gives the whole weight's product."""
    from llmrun.kernels.quant import quant_linear

    g = torch.Generator().manual_seed(bits)
    out_features, in_features = 2 * chunk_rows(64) + 5, 64
    q = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.uint8)
    qweight = pack_int4(q) if bits == 4 else (q.to(torch.int8) - 8)
    scales = torch.rand(out_features, 2, generator=g) + 0.1
    mins = torch.randn(out_features, 2, generator=g) if bits == 4 else None
    qw = QuantWeight(bits, 32, out_features, in_features, qweight, scales, mins)
    whole = dequantize(qw)
    pieces = list(row_slices(qw, chunk_rows(in_features)))
    assert [start for start, _ in pieces] == [0, chunk_rows(64), 2 * chunk_rows(64)] and pieces[-1][1].out_features == 5
    assert torch.equal(torch.cat([dequantize(part) for _, part in pieces]), whole)
    buffer = torch.full((5, in_features), float("nan"))
    assert torch.equal(dequantize(pieces[-1][1], buffer), whole[-5:])
    x, bias = torch.randn(3, in_features, generator=g), torch.randn(out_features, generator=g)
    torch.testing.assert_close(quant_linear(x, qw, bias), torch.nn.functional.linear(x, whole, bias),
                               rtol=1e-6, atol=1e-6)


def test_int8_per_channel_has_no_mins():
    q = torch.tensor([[-128, 127, 5, -3]], dtype=torch.int8)
    qw = QuantWeight(8, 4, 1, 4, q, torch.tensor([[0.5]]), None)
    assert dequantize(qw).tolist() == [[-64.0, 63.5, 2.5, -1.5]]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(bits=3), "bits must be 4 or 8"),
    (dict(group_size=48), "does not divide"),
    (dict(mins=None), "int4 needs mins"),
    (dict(scales=torch.zeros(4, 2, dtype=torch.float16)), "scales is torch.float16"),
])
def test_a_weight_that_breaks_the_layout_is_refused(kwargs, fragment):
    qw, _ = int4_weight()
    fields = dict(bits=4, group_size=32, out_features=4, in_features=64, qweight=qw.qweight, scales=qw.scales,
                  mins=qw.mins)
    fields.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        QuantWeight(**fields)


def test_round_trip_stores_exact_float16_scales_in_float16(tmp_path):
    qw, _ = int4_weight()
    half_exact = QuantWeight(4, 32, 4, 64, qw.qweight, qw.scales.half().float(), qw.mins.half().float())
    parts = stored_tensors("a.weight", half_exact)
    assert parts["a.weight.scales"].dtype == torch.float16
    assert stored_tensors("b.weight", qw)["b.weight.scales"].dtype == torch.float32  # not exact: kept float32
    file = tmp_path / "m.safetensors"
    meta = QuantMetadata({"a.weight": TensorFormat(4, 32, 4, 64)}, ("norm.weight",))
    save_quantized(file, {**parts, "norm.weight": torch.ones(64, dtype=torch.bfloat16)}, meta)
    loaded = load_quantized(file)
    assert torch.equal(dequantize(loaded.quantized["a.weight"]), dequantize(half_exact))
    assert list(loaded.floats) == ["norm.weight"]
    assert loaded.meta.kept_16bit == ("norm.weight",)
    assert not list(tmp_path.glob(".*.tmp"))


def test_two_level_scales_expand_to_super_times_code(tmp_path):
    """A K-quant's group scale is an fp16 super scale times a 6-bit code; min likewise (stored as -dmin)."""
    out, inp, group, sup = 2, 512, 32, 256
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (out, inp), dtype=torch.uint8, generator=g)
    scales = TwoLevel(torch.randint(0, 64, (out, inp // group), dtype=torch.uint8, generator=g),
                      torch.rand(out, inp // sup, generator=g).half())
    mins = TwoLevel(torch.randint(0, 64, (out, inp // group), dtype=torch.uint8, generator=g),
                    -torch.rand(out, inp // sup, generator=g).half())
    file = tmp_path / "k.safetensors"
    meta = QuantMetadata({"x.weight": TensorFormat(4, group, out, inp, super_group=sup, source="gguf:Q4_K")},
                         source="kept from GGUF")
    save_quantized(file, stored_two_level("x.weight", pack_int4(q), scales, mins), meta)
    qw = load_quantized(file).quantized["x.weight"]
    # group 9 lies in super block 1 (groups 8..15)
    assert qw.scales[1, 9] == scales.supers[1, 1].float() * scales.codes[1, 9].float()
    assert qw.mins[0, 3] == mins.supers[0, 0].float() * mins.codes[0, 3].float()
    assert dequantize(qw)[1, 300] == q[1, 300].float() * qw.scales[1, 9] + qw.mins[1, 9]


def test_stacking_mixed_formats_loses_nothing():
    """q/k as int4 g32 beside v as int8 g16 (a GGUF's Q4_K beside Q6_K) stack as int8 g16, values equal."""
    a, _ = int4_weight(out=3, inp=64, group=32, seed=1)
    q8 = torch.randint(-32, 32, (2, 64), dtype=torch.int8)
    b = QuantWeight(8, 16, 2, 64, q8, torch.rand(2, 4) + 0.1, None)
    both = concat_quant([a, b])
    assert (both.bits, both.group_size, both.out_features) == (8, 16, 5)
    assert torch.equal(dequantize(both), torch.cat([dequantize(a), dequantize(b)]))
    alike = concat_quant([a, a])
    assert alike.bits == 4 and torch.equal(dequantize(alike), torch.cat([dequantize(a)] * 2))


def _write(file, tensors, block):
    save_file(tensors, str(file), metadata=None if block is None else {METADATA_KEY: block})


@pytest.mark.parametrize("block, tensors, fragment", [
    (None, None, "no 'llmrun.quant' metadata block"),
    ("{not json", None, "metadata block is malformed"),
    (json.dumps({"version": 99, "tensors": {}}), None, "version 99 is not supported"),
    (json.dumps({"version": 1, "tensors": {}}), None, "a.weight is quantized but not in"),
    (json.dumps({"version": 1, "tensors": {"a.weight": {"bits": 4, "group": 32, "shape": [4, 64]},
                                           "b.weight": {"bits": 4, "group": 32, "shape": [4, 64]}}}),
     None, "lists b.weight, which has no qweight"),
    (json.dumps({"version": 1, "tensors": {"a.weight": {"bits": 8, "group": 32, "shape": [4, 64]}}}),
     None, "a.weight does not match its metadata entry"),
    (json.dumps({"version": 1, "tensors": {"a.weight": {"bits": 4, "group": 32, "shape": [4, 128]}}}),
     None, "a.weight does not match its metadata entry"),
    (json.dumps({"version": 1, "tensors": {"a.weight": {"bits": 4, "group": 32, "shape": [4, 64]}}}),
     "no-mins", "int4 needs mins"),
])
def test_an_inconsistent_block_is_one_line(tmp_path, block, tensors, fragment):
    qw, _ = int4_weight()
    parts = stored_tensors("a.weight", qw)
    if tensors == "no-mins":
        del parts["a.weight.mins"]
    file = tmp_path / "bad.safetensors"
    _write(file, parts, block)
    with pytest.raises(InvalidModelError, match=fragment) as err:
        load_quantized(file)
    assert "\n" not in str(err.value) and str(file) in str(err.value)


def test_save_refuses_a_block_that_disagrees_with_the_tensors(tmp_path):
    qw, _ = int4_weight()
    with pytest.raises(InvalidModelError, match="not in the 'llmrun.quant' block"):
        save_quantized(tmp_path / "m.safetensors", stored_tensors("a.weight", qw), QuantMetadata({}))
    assert list(tmp_path.iterdir()) == []
