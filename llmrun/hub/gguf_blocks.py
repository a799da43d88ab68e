"""GGUF quantized blocks read into llmrun's quantized format with their exact values (no rounding).

Each GGML block type maps onto an llmrun group (llmrun/quant/format.py: w = q * scale + min):
  Q8_0 -> int8 g32, scale d                  Q4_0 -> int4 g32, scale d, min -8*d
  Q4_1 -> int4 g32, scale d, min m           Q5_0 -> int8 g32, q - 16, scale d
  Q5_1 -> int8 g32, scale d, min m           Q4_K -> int4 g32, scale d*sc, min -dmin*m (two-level)
  Q5_K -> int8 g32, scale d*sc, min -dmin*m  Q6_K -> int8 g16, q - 32, scale d*sc (two-level)
  Q2_K -> int8 g16, scale d*sc, min -dmin*m  Q3_K -> int8 g16, q, scale d*sc (two-level)
Every product here is exact in float32 (an fp16 times integers of at most 8 bits), so the values
equal gguf's own dequantize; the import checks that per tensor before keeping one. A K-quant's
signed 6- or 8-bit scale sc is stored as |sc| with its sign moved onto the group's int8 values
(rounding to nearest is symmetric, so (d*|sc|) * (-q) is exactly (d*sc) * q).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from llmrun.quant.format import QuantWeight, pack_int4
from llmrun.quant.stored import TwoLevel, stored_tensors, stored_two_level

SUPER_BLOCK = 256  # QK_K: the inputs one K-quant block (one d, one dmin) covers


@dataclass(frozen=True, eq=False)
class KeptWeight:
    """A GGUF tensor's quantized values in llmrun's groups, before int4 packing."""

    source_type: str  # the GGML type name, e.g. "Q4_K"
    bits: int  # 4 or 8
    group_size: int
    values: torch.Tensor  # [out, in]: uint8 0..15 (int4) or int8
    scales: torch.Tensor | TwoLevel  # float32 [out, groups], or fp16 supers x uint8 codes
    mins: torch.Tensor | TwoLevel | None

    @property
    def super_group(self) -> int:
        return SUPER_BLOCK if isinstance(self.scales, TwoLevel) else 0

    def packed(self) -> torch.Tensor:
        return pack_int4(self.values) if self.bits == 4 else self.values

    def quant_weight(self) -> QuantWeight:
        """The in-memory form every kernel consumes (two-level scales expanded to float32)."""
        out_features, in_features = self.values.shape
        return QuantWeight(self.bits, self.group_size, out_features, in_features, self.packed(),
                           self._expanded(self.scales), self._expanded(self.mins))

    def stored(self, name: str) -> dict[str, torch.Tensor]:
        """Its on-disk tensors under the float weight's name (quant/stored.py's one- or two-level form)."""
        if isinstance(self.scales, TwoLevel):
            assert self.mins is None or isinstance(self.mins, TwoLevel)
            return stored_two_level(name, self.packed(), self.scales, self.mins)
        return stored_tensors(name, self.quant_weight())

    def rows(self, order: torch.Tensor) -> "KeptWeight":
        """The same weight with its output rows taken in `order` (llama.cpp's q/k row layout undone)."""
        def take(part):
            if part is None:
                return None
            if isinstance(part, TwoLevel):
                return TwoLevel(part.codes[order].contiguous(), part.supers[order].contiguous())
            return part[order].contiguous()

        return KeptWeight(self.source_type, self.bits, self.group_size, take(self.values),
                          take(self.scales), take(self.mins))

    def _expanded(self, part):
        if isinstance(part, TwoLevel):
            return part.expand(self.group_size, SUPER_BLOCK)
        return part


def kept_types() -> dict[str, tuple[int, int]]:
    """GGML type name -> (inputs a block covers, bytes a block takes) for every type kept exactly."""
    return {name: (block, size) for name, (block, size, _) in _READERS.items()}


def read_blocks(type_name: str, raw: np.ndarray, out_features: int, in_features: int) -> KeptWeight:
    """Read `raw` (uint8 [out, bytes a row]) of GGML type `type_name` into its exact llmrun groups."""
    block, size, reader = _READERS[type_name]
    blocks = np.array(raw, dtype=np.uint8).reshape(-1, size)  # a copy: [out * blocks a row, block bytes]
    return reader(blocks, out_features, in_features)


# Shared pieces ---------------------------------------------------------------------------------

def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block: float16 [num_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16)


def _f32(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)


def _low_then_high(packed: np.ndarray) -> np.ndarray:
    """[n, k] bytes -> [n, 2k]: the k low nibbles, then the k high nibbles (ggml's order in a run)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _bit_planes(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """[n, k] bytes -> [n, count * k]: plane p holds the `width`-bit field at bit p*width of each byte."""
    mask = (1 << width) - 1
    return np.concatenate([(bits >> (p * width)) & mask for p in range(count)], axis=1)


def _k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, uint8 [n, 8] each.

    Sub-blocks 0-3 keep scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7 keep
    their low 4 bits in the nibbles of bytes 8-11 and their top 2 bits in the top of bytes 0-7.
    """
    first, second, last = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([first & 0x3F, (last & 0x0F) | ((first >> 6) << 4)], axis=1)
    mins = np.concatenate([second & 0x3F, (last >> 4) | ((second >> 6) << 4)], axis=1)
    return scales, mins


def _q3k_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes -> sixteen signed 6-bit scales (stored with an offset of 32), int16 [n, 16]."""
    low = _low_then_high(packed[:, 0:8])  # [n, 16] low 4 bits
    high = _bit_planes(packed[:, 8:12], 4, 2)  # [n, 16] top 2 bits
    return (low | (high << 4)).astype(np.int16) - 32


def _rows(values: np.ndarray, out_features: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values).reshape(out_features, -1))


def _one_level(type_name, bits, group, q, scales, mins, out_features) -> KeptWeight:
    return KeptWeight(type_name, bits, group, _rows(q, out_features), _rows(_f32(scales), out_features),
                      None if mins is None else _rows(_f32(mins), out_features))


def _two_level(type_name, bits, group, q, codes, supers, min_codes, min_supers, out_features) -> KeptWeight:
    scales = TwoLevel(_rows(codes.astype(np.uint8), out_features), _rows(supers, out_features))
    mins = None
    if min_codes is not None:
        mins = TwoLevel(_rows(min_codes.astype(np.uint8), out_features), _rows(min_supers, out_features))
    return KeptWeight(type_name, bits, group, _rows(q, out_features), scales, mins)


def _fold_signs(q: np.ndarray, signed_scales: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values with each group's scale sign moved onto them, the scales' magnitudes as codes)."""
    num_blocks = q.shape[0]
    negative = np.repeat(signed_scales < 0, group, axis=1).reshape(num_blocks, -1)
    folded = np.where(negative, -q.astype(np.int16), q.astype(np.int16)).astype(np.int8)
    return folded, np.abs(signed_scales.astype(np.int16)).astype(np.uint8)


# One reader per type: blocks uint8 [num_blocks, block bytes] -> KeptWeight ------------------------

def _q8_0(blocks, out_features, in_features):
    d = _half(blocks, 0)
    q = np.ascontiguousarray(blocks[:, 2:34]).view(np.int8)
    return _one_level("Q8_0", 8, 32, q, d, None, out_features)


def _q4_0(blocks, out_features, in_features):
    d = _f32(_half(blocks, 0))
    return _one_level("Q4_0", 4, 32, _low_then_high(blocks[:, 2:18]), d, d * np.float32(-8), out_features)


def _q4_1(blocks, out_features, in_features):
    return _one_level("Q4_1", 4, 32, _low_then_high(blocks[:, 4:20]), _half(blocks, 0), _half(blocks, 2),
                      out_features)


def _five_bits(low_nibbles: np.ndarray, high_bits: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: 16 bytes of nibbles and a little-endian 32-bit mask of fifth bits -> [n, 32] 0..31."""
    fifth = _bit_planes(high_bits, 8, 1).reshape(-1, 8, 4)  # [n, bit p, byte k]
    fifth = fifth.transpose(0, 2, 1).reshape(-1, 32)  # element 8k + p: bit 8k + p of the mask
    return _low_then_high(low_nibbles) | (fifth << 4)


def _q5_0(blocks, out_features, in_features):
    q = _five_bits(blocks[:, 6:22], blocks[:, 2:6]).astype(np.int8) - np.int8(16)
    return _one_level("Q5_0", 8, 32, q, _half(blocks, 0), None, out_features)


def _q5_1(blocks, out_features, in_features):
    q = _five_bits(blocks[:, 8:24], blocks[:, 4:8]).astype(np.int8)
    return _one_level("Q5_1", 8, 32, q, _half(blocks, 0), _half(blocks, 2), out_features)


def _k4_values(packed: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 values 0..15: each run of 32 bytes gives 32 low nibbles then 32 high ones."""
    return np.concatenate([_low_then_high(packed[:, 32 * c:32 * c + 32]) for c in range(4)], axis=1)


def _q4_k(blocks, out_features, in_features):
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    return _two_level("Q4_K", 4, 32, _k4_values(blocks[:, 16:144]), scales, _half(blocks, 0),
                      mins, -_half(blocks, 2), out_features)


def _q5_k(blocks, out_features, in_features):
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    fifth = _bit_planes(blocks[:, 16:48], 8, 1)  # [n, 256]: sub-block s takes bit s of the 32 bytes
    q = (_k4_values(blocks[:, 48:176]) | (fifth << 4)).astype(np.int8)
    return _two_level("Q5_K", 8, 32, q, scales, _half(blocks, 0), mins, -_half(blocks, 2), out_features)


def _q6_k(blocks, out_features, in_features):
    low, high = blocks[:, 0:128], blocks[:, 128:192]
    halves = []
    for h in range(2):  # each half of 128 values: 64 low bytes' nibbles, 32 bytes of 2-bit tops
        nibbles = _low_then_high(low[:, 64 * h:64 * h + 64])  # [n, 128]
        tops = _bit_planes(high[:, 32 * h:32 * h + 32], 4, 2)  # [n, 128]
        halves.append(nibbles | (tops << 4))
    q = np.concatenate(halves, axis=1).astype(np.int8) - np.int8(32)
    signed_scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8)
    folded, codes = _fold_signs(q, signed_scales, 16)
    return _two_level("Q6_K", 8, 16, folded, codes, _half(blocks, 208), None, None, out_features)


def _q2_k(blocks, out_features, in_features):
    packed_scales = blocks[:, 0:16]
    q = np.concatenate([_bit_planes(blocks[:, 16 + 32 * h:48 + 32 * h], 4, 2) for h in range(2)], axis=1)
    return _two_level("Q2_K", 8, 16, q.astype(np.int8), packed_scales & 0x0F, _half(blocks, 80),
                      packed_scales >> 4, -_half(blocks, 82), out_features)


def _q3_k(blocks, out_features, in_features):
    low = np.concatenate([_bit_planes(blocks[:, 32 + 32 * h:64 + 32 * h], 4, 2) for h in range(2)], axis=1)
    cleared = _bit_planes(blocks[:, 0:32], 8, 1) ^ 1  # a clear mask bit subtracts 4
    q = low.astype(np.int16) - 4 * cleared.astype(np.int16)
    folded, codes = _fold_signs(q, _q3k_scales(blocks[:, 96:108]), 16)
    return _two_level("Q3_K", 8, 16, folded, codes, _half(blocks, 108), None, None, out_features)


_Reader = Callable[[np.ndarray, int, int], KeptWeight]
_READERS: dict[str, tuple[int, int, _Reader]] = {
    "Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1),
    "Q2_K": (256, 84, _q2_k), "Q3_K": (256, 110, _q3_k), "Q4_K": (256, 144, _q4_k),
    "Q5_K": (256, 176, _q5_k), "Q6_K": (256, 210, _q6_k),
}
