"""GGUF blocks read into llmrun's quantized format: the same values as gguf's own dequantize, to the bit.

Types gguf-py can quantize are made from real (random normal) weights with gguf.quants.quantize;
K-quant blocks are built here byte by byte, as ggml lays them out, from random fields, and reading
them must give back those very fields as well as gguf's values.
"""

import numpy as np
import pytest
import torch

from llmrun.hub.gguf_blocks import kept_types, read_blocks
from llmrun.quant.format import dequantize
from llmrun.quant.stored import QuantMetadata, TensorFormat, TwoLevel, load_quantized, save_quantized

ROWS = 6
SUPER = 256


def gguf_values(raw: np.ndarray, type_name: str) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).copy())


def assert_same_values(kept, expected: torch.Tensor) -> None:
    ours = dequantize(kept.quant_weight())
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert torch.equal(ours, expected), f"{(ours != expected).sum().item()} values differ"


def assert_stored_round_trip(kept, tmp_path) -> None:
    """The on-disk tensors (one- or two-level) load back into the very same QuantWeight values."""
    out_features, in_features = kept.values.shape
    fmt = TensorFormat(kept.bits, kept.group_size, out_features, in_features, kept.super_group,
                       f"gguf:{kept.source_type}")
    target = tmp_path / "w.safetensors"
    save_quantized(target, kept.stored("w"), QuantMetadata({"w": fmt}, (), "test"))
    loaded = load_quantized(target).quantized["w"]
    assert torch.equal(dequantize(loaded), dequantize(kept.quant_weight()))


def real_weights(columns: int, seed: int) -> np.ndarray:
    weights = np.random.default_rng(seed).standard_normal((ROWS, columns)).astype(np.float32) * 0.05
    weights[1] = 0.0  # an all-zero group: d = 0
    weights[2, :32] = np.float32(3.0)  # a constant group
    return weights


@pytest.mark.parametrize("type_name,bits,group", [
    ("Q8_0", 8, 32), ("Q4_0", 4, 32), ("Q4_1", 4, 32), ("Q5_0", 8, 32), ("Q5_1", 8, 32),
])
def test_gguf_quantized_real_weights_read_exactly(type_name, bits, group, tmp_path):
    import gguf

    raw = gguf.quants.quantize(real_weights(128, seed=bits + group), gguf.GGMLQuantizationType[type_name])
    kept = read_blocks(type_name, raw, ROWS, 128)
    assert (kept.bits, kept.group_size, kept.super_group) == (bits, group, 0)
    assert kept.values.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert_same_values(kept, gguf_values(raw, type_name))
    assert_stored_round_trip(kept, tmp_path)


def test_q4_0_and_q8_0_keep_their_fp16_scales_exactly(tmp_path):
    """d is fp16 in the file: stored as fp16 (and -8d for Q4_0's min), so the sizes match the GGUF's."""
    import gguf

    for type_name in ("Q4_0", "Q8_0"):
        raw = gguf.quants.quantize(real_weights(64, seed=1), gguf.GGMLQuantizationType[type_name])
        stored = read_blocks(type_name, raw, ROWS, 64).stored("w")
        assert all(t.dtype == torch.float16 for n, t in stored.items() if not n.endswith("qweight"))
        assert sum(t.numel() * t.element_size() for t in stored.values()) <= raw.nbytes * 20 / 18


# K-quant blocks, packed here from their fields -----------------------------------------------------

def fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)  # [blocks, 2]


def random_halves(rng, count: int) -> np.ndarray:
    """Finite fp16 values of both signs and a wide range of exponents (zero included)."""
    values = (rng.standard_normal(count) * np.exp2(rng.integers(-14, 4, count))).astype(np.float16)
    values[0] = 0
    return values


def pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block into ggml's 12 bytes (get_scale_min_k4's layout)."""
    packed = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    for j in range(4):
        packed[:, j] = sc[:, j] | ((sc[:, j + 4] >> 4) << 6)
        packed[:, j + 4] = m[:, j] | ((m[:, j + 4] >> 4) << 6)
        packed[:, j + 8] = (sc[:, j + 4] & 0x0F) | ((m[:, j + 4] & 0x0F) << 4)
    return packed


def pack_k_nibbles(q: np.ndarray) -> np.ndarray:
    """256 values 0..15 into 128 bytes: byte 32c + l holds value 64c + l (low) and 64c + 32 + l (high)."""
    packed = np.zeros((q.shape[0], 128), dtype=np.uint8)
    for c in range(4):
        for lane in range(32):
            packed[:, 32 * c + lane] = (q[:, 64 * c + lane] & 0x0F) | ((q[:, 64 * c + 32 + lane] & 0x0F) << 4)
    return packed


def pack_two_bit_runs(q: np.ndarray) -> np.ndarray:
    """256 values 0..3 into 64 bytes: byte 32h + l holds value 128h + 32s + l at bits 2s."""
    packed = np.zeros((q.shape[0], 64), dtype=np.uint8)
    for half in range(2):
        for shift in range(4):
            packed[:, 32 * half:32 * half + 32] |= (q[:, 128 * half + 32 * shift:128 * half + 32 * shift + 32]
                                                    & 3) << (2 * shift)
    return packed


def k_fields(rng, num_blocks: int, value_bits: int) -> dict:
    return {"d": random_halves(rng, num_blocks), "dmin": random_halves(rng, num_blocks),
            "sc": rng.integers(0, 64, (num_blocks, 8)).astype(np.uint8),
            "m": rng.integers(0, 64, (num_blocks, 8)).astype(np.uint8),
            "q": rng.integers(0, 1 << value_bits, (num_blocks, SUPER)).astype(np.uint8)}


def q4_k_block(f: dict) -> np.ndarray:
    return np.concatenate([fp16_bytes(f["d"]), fp16_bytes(f["dmin"]), pack_k_scales(f["sc"], f["m"]),
                           pack_k_nibbles(f["q"])], axis=1)


def q5_k_block(f: dict) -> np.ndarray:
    fifth = np.zeros((f["q"].shape[0], 32), dtype=np.uint8)
    for sub in range(8):
        fifth |= (f["q"][:, 32 * sub:32 * sub + 32] >> 4) << sub
    return np.concatenate([fp16_bytes(f["d"]), fp16_bytes(f["dmin"]), pack_k_scales(f["sc"], f["m"]), fifth,
                           pack_k_nibbles(f["q"])], axis=1)


def q6_k_block(q: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q: 0..63 [blocks, 256]; scales int8 [blocks, 16]; d fp16 [blocks]."""
    num_blocks = q.shape[0]
    low, high = np.zeros((num_blocks, 128), np.uint8), np.zeros((num_blocks, 64), np.uint8)
    for half in range(2):
        quarter = [q[:, 128 * half + 32 * s:128 * half + 32 * s + 32] for s in range(4)]
        low[:, 64 * half:64 * half + 32] = (quarter[0] & 0x0F) | ((quarter[2] & 0x0F) << 4)
        low[:, 64 * half + 32:64 * half + 64] = (quarter[1] & 0x0F) | ((quarter[3] & 0x0F) << 4)
        high[:, 32 * half:32 * half + 32] = sum(((quarter[s] >> 4) << (2 * s)) for s in range(4)).astype(np.uint8)
    return np.concatenate([low, high, scales.astype(np.int8).view(np.uint8), fp16_bytes(d)], axis=1)


def q2_k_block(f: dict) -> np.ndarray:
    sc, m = f["sc16"], f["m16"]
    return np.concatenate([sc | (m << 4), pack_two_bit_runs(f["q"]), fp16_bytes(f["d"]), fp16_bytes(f["dmin"])],
                          axis=1)


def q3_k_block(q: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q: -4..3 [blocks, 256]; scales -32..31 [blocks, 16]; d fp16 [blocks]."""
    high_bit = (q >= 0).astype(np.uint8)  # a set mask bit: no -4
    low = np.where(q >= 0, q, q + 4).astype(np.uint8)
    mask = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for t in range(8):
        mask |= high_bit[:, 32 * t:32 * t + 32] << t
    biased = (scales + 32).astype(np.uint8)  # 0..63
    packed = np.zeros((q.shape[0], 12), dtype=np.uint8)
    for i in range(16):
        packed[:, i % 8] |= (biased[:, i] & 0x0F) << (4 * (i // 8))
        packed[:, 8 + i % 4] |= (biased[:, i] >> 4) << (2 * (i // 4))
    return np.concatenate([mask, pack_two_bit_runs(low), packed, fp16_bytes(d)], axis=1)


def rows_of(blocks: np.ndarray, columns: int) -> np.ndarray:
    return blocks.reshape(ROWS, -1)  # [rows, bytes a row]: blocks laid row after row


def per_row(values: np.ndarray, columns: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values).reshape(ROWS, -1))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])
def test_q4_k_and_q5_k_give_back_their_fields_and_gguf_values(type_name, tmp_path):
    columns = 2 * SUPER
    rng = np.random.default_rng(4)
    fields = k_fields(rng, ROWS * columns // SUPER, 4 if type_name == "Q4_K" else 5)
    raw = rows_of(q4_k_block(fields) if type_name == "Q4_K" else q5_k_block(fields), columns)
    kept = read_blocks(type_name, raw, ROWS, columns)
    assert (kept.bits, kept.group_size, kept.super_group) == ((4, 32, SUPER) if type_name == "Q4_K" else (8, 32, SUPER))
    assert torch.equal(kept.values.to(torch.int16), per_row(fields["q"], columns).to(torch.int16))
    assert isinstance(kept.scales, TwoLevel) and isinstance(kept.mins, TwoLevel)
    assert torch.equal(kept.scales.codes, per_row(fields["sc"], columns))
    assert torch.equal(kept.mins.codes, per_row(fields["m"], columns))
    assert torch.equal(kept.scales.supers, per_row(fields["d"], columns))
    assert torch.equal(kept.mins.supers, per_row(-fields["dmin"], columns))
    assert_same_values(kept, gguf_values(raw, type_name))
    assert_stored_round_trip(kept, tmp_path)


def test_q6_k_moves_negative_scales_signs_onto_the_values(tmp_path):
    columns = 2 * SUPER
    rng = np.random.default_rng(6)
    num_blocks = ROWS * columns // SUPER
    q = rng.integers(0, 64, (num_blocks, SUPER)).astype(np.uint8)
    q[0, :16] = 0  # -32: negated by a negative scale it becomes 32, still an int8
    scales = rng.integers(-128, 128, (num_blocks, 16)).astype(np.int8)
    scales[0, :3] = (-128, 0, 127)
    d = random_halves(rng, num_blocks)
    raw = rows_of(q6_k_block(q, scales, d), columns)
    kept = read_blocks("Q6_K", raw, ROWS, columns)
    assert (kept.bits, kept.group_size, kept.mins) == (8, 16, None)
    signs = np.where(np.repeat(scales < 0, 16, axis=1), -1, 1)
    assert torch.equal(kept.values.to(torch.int16), per_row((q.astype(np.int16) - 32) * signs, columns))
    assert torch.equal(kept.scales.codes, per_row(np.abs(scales.astype(np.int16)), columns).to(torch.uint8))
    assert_same_values(kept, gguf_values(raw, "Q6_K"))
    assert_stored_round_trip(kept, tmp_path)


def test_q2_k_and_q3_k_read_exactly(tmp_path):
    columns = SUPER
    rng = np.random.default_rng(2)
    num_blocks = ROWS * columns // SUPER
    fields = {"sc16": rng.integers(0, 16, (num_blocks, 16)).astype(np.uint8),
              "m16": rng.integers(0, 16, (num_blocks, 16)).astype(np.uint8),
              "q": rng.integers(0, 4, (num_blocks, SUPER)).astype(np.uint8),
              "d": random_halves(rng, num_blocks), "dmin": random_halves(rng, num_blocks)}
    raw = rows_of(q2_k_block(fields), columns)
    kept = read_blocks("Q2_K", raw, ROWS, columns)
    assert torch.equal(kept.values.to(torch.int16), per_row(fields["q"], columns).to(torch.int16))
    assert_same_values(kept, gguf_values(raw, "Q2_K"))
    assert_stored_round_trip(kept, tmp_path)

    q = rng.integers(-4, 4, (num_blocks, SUPER)).astype(np.int16)
    scales = rng.integers(-32, 32, (num_blocks, 16)).astype(np.int16)
    raw = rows_of(q3_k_block(q, scales, random_halves(rng, num_blocks)), columns)
    kept = read_blocks("Q3_K", raw, ROWS, columns)
    signs = np.where(np.repeat(scales < 0, 16, axis=1), -1, 1)
    assert torch.equal(kept.values.to(torch.int16), per_row(q * signs, columns))
    assert_same_values(kept, gguf_values(raw, "Q3_K"))
    assert_stored_round_trip(kept, tmp_path)


def test_random_bytes_of_every_kept_type_match_gguf():
    """Any bytes are a block (finite d): every kept type, on blocks no quantizer would choose."""
    rng = np.random.default_rng(9)
    for type_name, (block, size) in kept_types().items():
        columns = 2 * max(block, 32)
        raw = rng.integers(0, 256, (ROWS, columns // block * size)).astype(np.uint8)
        halves = raw.reshape(-1, size)
        for at in _half_offsets(type_name, size):  # keep the fp16 fields finite
            halves[:, at:at + 2] = fp16_bytes(random_halves(rng, halves.shape[0]))
        assert_same_values(read_blocks(type_name, raw, ROWS, columns), gguf_values(raw, type_name))


def _half_offsets(type_name: str, size: int) -> tuple[int, ...]:
    if type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        return (0, 2)
    if type_name == "Q2_K":
        return (size - 4, size - 2)
    if type_name in ("Q3_K", "Q6_K"):
        return (size - 2,)
    return (0,)
