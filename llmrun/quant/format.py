"""The quantized-weight format in memory (issue 16): QuantWeight, the int4 packing and the reference
dequantize; quant/stored.py is its safetensors form.

Format version 1 (stored.FORMAT_VERSION). In memory every kernel consumes a `QuantWeight`:
  int8: qweight int8 [out, in], signed; int4: qweight uint8 [out, in // 2], column 2j in the low nibble and
  2j + 1 in the high nibble, unsigned 0..15. scales (and mins, required for int4) float32 [out, in // group].
  `dequantize` is THE definition every kernel is checked against: w = q * scale + min, per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from llmrun.quant.spec import INT4_GROUPS

DEQUANTIZE_CHUNK_BYTES = 2 << 20  # float32 bytes of a weight's rows the piecewise paths dequantize at a time


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """One linear layer's weight in compressed form: what every quantized matmul kernel consumes."""

    bits: int  # 8 or 4
    group_size: int  # along the input dim; == in_features for int8 per output channel
    out_features: int
    in_features: int
    qweight: torch.Tensor  # int8 [out, in] | uint8 [out, in // 2] (two int4 values a byte)
    scales: torch.Tensor  # float32 [out, in // group_size]
    mins: torch.Tensor | None = None  # float32 [out, in // group_size]; required for int4

    def __post_init__(self) -> None:
        problem = layout_problem(self.bits, self.group_size, self.out_features, self.in_features,
                                 self.qweight, self.scales, self.mins)
        if problem:
            raise ValueError(f"QuantWeight: {problem}")

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def num_bytes(self) -> int:
        """Bytes held in memory (packed values, float32 scales and mins)."""
        parts = [self.qweight, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "QuantWeight":
        """The same weight with its tensors on `device` (packed: the bytes moved are the compressed ones)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantWeight(self.bits, self.group_size, self.out_features, self.in_features,
                           move(self.qweight), move(self.scales), move(self.mins))


def layout_problem(bits: int, group_size: int, out_features: int, in_features: int,
                   qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> str:
    """What is wrong with these parts as a QuantWeight, or '' when they fit the format."""
    if bits not in (4, 8):
        return f"bits must be 4 or 8, not {bits}"
    if group_size <= 0 or in_features % group_size:
        return f"group {group_size} does not divide the {in_features} inputs"
    if bits == 4 and group_size not in INT4_GROUPS:
        return f"int4 groups are {', '.join(map(str, INT4_GROUPS))}, not {group_size}"
    if bits == 8 and group_size != in_features and group_size % 16:
        return f"int8 groups are multiples of 16 or the whole input ({in_features}), not {group_size}"
    if bits == 4 and mins is None:
        return "int4 needs mins (the format is asymmetric)"
    packed = (out_features, in_features // 2) if bits == 4 else (out_features, in_features)
    want_dtype = torch.uint8 if bits == 4 else torch.int8
    if qweight.dtype != want_dtype or tuple(qweight.shape) != packed:
        return (f"qweight is {qweight.dtype} {list(qweight.shape)}, "
                f"int{bits} wants {want_dtype} {list(packed)}")
    grouped = (out_features, in_features // group_size)
    for part, tensor in (("scales", scales), ("mins", mins)):
        if tensor is not None and (tensor.dtype != torch.float32 or tuple(tensor.shape) != grouped):
            return f"{part} is {tensor.dtype} {list(tensor.shape)}, wants torch.float32 {list(grouped)}"
    return ""


def concat_quant(weights: list[QuantWeight]) -> QuantWeight:
    """Weights of the same inputs stacked along the outputs (q/k/v into one qkv). Alike formats are
    concatenated as they are; mixed ones (a GGUF's Q4_K beside Q6_K) become int8 with the common
    group and zero mins where one had none: every q * scale + min is unchanged, so nothing is lost."""
    first = weights[0]
    if len({w.in_features for w in weights}) != 1:
        raise ValueError("stacked weights must share their inputs")
    if len(weights) == 1:
        return first
    alike = all((w.bits, w.group_size, w.mins is None) == (first.bits, first.group_size, first.mins is None)
                for w in weights)
    if not alike:
        group = math.gcd(*(w.group_size for w in weights))
        with_mins = any(w.mins is not None for w in weights)
        weights = [_as_int8(w, group, with_mins) for w in weights]
        first = weights[0]
    mins = None if first.mins is None else torch.cat([w.mins for w in weights])
    return QuantWeight(first.bits, first.group_size, sum(w.out_features for w in weights), first.in_features,
                       torch.cat([w.qweight for w in weights]), torch.cat([w.scales for w in weights]), mins)


def _as_int8(qw: QuantWeight, group: int, with_mins: bool) -> QuantWeight:
    """The same values as int8 in groups of `group` (which divides qw's group): exact."""
    q = unpack_int4(qw.qweight).to(torch.int8) if qw.bits == 4 else qw.qweight
    repeat = qw.group_size // group
    scales = qw.scales.repeat_interleave(repeat, dim=1)
    mins = qw.mins.repeat_interleave(repeat, dim=1) if qw.mins is not None else None
    if with_mins and mins is None:
        mins = torch.zeros_like(scales)
    return QuantWeight(8, group, qw.out_features, qw.in_features, q, scales, mins)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in // 2] -> uint8 [out, in], values 0..15 (low nibble first)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] with values 0..15 -> uint8 [out, in // 2] (column 2j low nibble, 2j + 1 high)."""
    if values.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of inputs, not {values.shape[-1]}")
    pairs = values.to(torch.uint8).reshape(values.shape[0], -1, 2)  # [out, in // 2, 2]
    return pairs[..., 0] | (pairs[..., 1] << 4)


def dequantize(qw: QuantWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: float32 [out, in] with w = q * scale + min per group (the definition kernels match),
    written into `out` (float32, contiguous, that shape, on qw's device) where given."""
    q = unpack_int4(qw.qweight) if qw.bits == 4 else qw.qweight
    shape = (qw.out_features, qw.num_groups, qw.group_size)
    if out is None:
        out = torch.empty((qw.out_features, qw.in_features), dtype=torch.float32, device=q.device)
    w = out.view(shape)  # [out, groups, group]
    w.copy_(q.reshape(shape))
    w.mul_(qw.scales.unsqueeze(-1))
    if qw.mins is not None:
        w.add_(qw.mins.unsqueeze(-1))
    return out


def row_slices(qw: QuantWeight, rows: int) -> Iterator[tuple[int, QuantWeight]]:
    """(first output, qw's outputs from there) `rows` outputs at a time, views of its parts."""
    for start in range(0, qw.out_features, rows):
        stop = min(start + rows, qw.out_features)
        part = lambda t: None if t is None else t[start:stop]  # noqa: E731
        yield start, QuantWeight(qw.bits, qw.group_size, stop - start, qw.in_features, part(qw.qweight),
                                 part(qw.scales), part(qw.mins))


def chunk_rows(in_features: int) -> int:
    """Outputs of a weight dequantized at once where it is done in pieces: DEQUANTIZE_CHUNK_BYTES of float32."""
    return max(1, DEQUANTIZE_CHUNK_BYTES // (4 * in_features))


def dequantize_rows(qw: QuantWeight, rows: torch.Tensor) -> torch.Tensor:
    """float32 [len(rows), in]: the rows `rows` (output indices) of `dequantize(qw)`, and only them
    (a compressed embedding table's lookup)."""
    rows = rows.to(qw.qweight.device)
    mins = None if qw.mins is None else qw.mins[rows]
    return dequantize(QuantWeight(qw.bits, qw.group_size, rows.numel(), qw.in_features, qw.qweight[rows],
                                  qw.scales[rows], mins))
