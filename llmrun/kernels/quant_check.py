"""The check a quantized matmul passes before it runs (kernels/quant.py's reference is the definition):
a bound on what its arithmetic may change, and probe weights and activations that break it for any
misread nibble, scale, min, group or activation block."""

from __future__ import annotations

import torch

from llmrun.kernels.interface import check_forced_to_fail
from llmrun.quant.format import QuantWeight, dequantize, pack_int4, row_slices, unpack_int4

ACT_BLOCK = 32  # inputs per activation block of the int8-activation kernels (llama.cpp's Q8_0 block)
CHECK_ROWS = (1, 3, 16)
PROBE_OUT = 256  # output rows a format's check probes: every output's sum is computed alike
BOUND_OUTPUTS = 64  # outputs within_quant_bound takes at a time


def within_quant_bound(actual: torch.Tensor, x: torch.Tensor, qw: QuantWeight, act_quantized: bool,
                       weight_rounded: bool = False) -> bool:
    """Whether `actual` (x @ W.T by some implementation) is the reference up to what that implementation's
    arithmetic may change: float32 sums in another order (a relative 2e-5 of sum |w x|, k up to ~16K),
    the output rounded to its dtype (half a unit in the last place, twice for slack), where
    the activations are rounded to int8 per block of 32 (`act_quantized`), up to half a step of each
    block's scale (max |x| / 127) times sum |w| over the block, and where the dequantized weight is
    rounded to x's dtype before the products (`weight_rounded`), half a unit in its last place of each
    weight: sum |w x| times half the dtype's epsilon. Computed BOUND_OUTPUTS outputs at a time, so
    its float64 copies of the weight stay small (a first-use check runs beside a model's weights)."""
    xs, actual = x.double().cpu(), actual.double().cpu()
    return all(_within(actual[:, start:start + BOUND_OUTPUTS], xs, x.dtype, part, act_quantized, weight_rounded)
               for start, part in output_slices(qw))


def output_slices(qw: QuantWeight):
    """(first output, the weight's outputs from there) BOUND_OUTPUTS at a time, on the CPU."""
    return row_slices(qw.to("cpu"), BOUND_OUTPUTS)


def _within(actual: torch.Tensor, xs: torch.Tensor, dtype: torch.dtype, qw: QuantWeight, act_quantized: bool,
            weight_rounded: bool) -> bool:
    """within_quant_bound for one slice of outputs (xs float64; `dtype`: the rows' own)."""
    weight = dequantize(qw).double()
    expected = xs @ weight.T
    bound = 2e-5 * (xs.abs() @ term_magnitudes(qw).T)
    if act_quantized:
        steps = xs.abs().reshape(xs.shape[0], -1, ACT_BLOCK).amax(-1) / 127  # [rows, blocks]
        per_input = steps.repeat_interleave(ACT_BLOCK, dim=1)  # [rows, in]
        bound = bound + 0.5 * 1.001 * (per_input @ weight.abs().T)
    if weight_rounded:
        bound = bound + 0.5 * 1.001 * torch.finfo(dtype).eps * (xs.abs() @ weight.abs().T)
    if dtype != torch.float32:
        bound = bound + expected.abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
    return bool(((actual - expected).abs() <= bound).all())


def term_magnitudes(qw: QuantWeight) -> torch.Tensor:
    """|q * scale| + |min| per weight [out, in] (float64): what a sum that keeps the scale and min terms
    apart adds up, so its rounding is bounded by these even where the two cancel in w itself."""
    q = unpack_int4(qw.qweight.cpu()) if qw.bits == 4 else qw.qweight.cpu()
    magnitudes = q.double().abs() * qw.scales.cpu().double().abs().repeat_interleave(qw.group_size, dim=1)
    if qw.mins is None:
        return magnitudes
    return magnitudes + qw.mins.cpu().double().abs().repeat_interleave(qw.group_size, dim=1)


def probe_weight(bits: int, group_size: int, out_features: int, in_features: int, with_mins: bool,
                 generator: torch.Generator) -> QuantWeight:
    """A weight of this format whose every value, scale and min shows if read wrongly: values over
    the whole range, scales spread over three orders of magnitude and of both signs, mins as large
    as a group's span, so a swapped nibble, a group read from the wrong place or a min left out moves
    an output far past the bound."""
    groups = in_features // group_size
    if bits == 4:
        values = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
        qweight = pack_int4(values)
    else:
        qweight = torch.randint(-128, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    magnitude = torch.exp(torch.empty(out_features, groups).uniform_(-4, 3, generator=generator)) * 0.01
    sign = torch.where(torch.rand(out_features, groups, generator=generator) < 0.2, -1.0, 1.0)
    scales = (magnitude * sign).to(torch.float32)
    mins = None
    if with_mins:
        mins = (torch.randn(out_features, groups, generator=generator) * 8 * magnitude).to(torch.float32)
    return QuantWeight(bits, group_size, out_features, in_features, qweight, scales, mins)


def probe_inputs(rows: int, in_features: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Activations whose blocks of 32 differ in scale by orders of magnitude (so an activation block
    scale applied to the wrong block shows), one large outlier a block, and some all-zero blocks."""
    blocks = -(-in_features // ACT_BLOCK)
    x = torch.randn(rows, blocks, ACT_BLOCK, generator=generator)
    x = x * torch.exp(torch.empty(rows, blocks, 1).uniform_(-5, 3, generator=generator))
    x[:, :, 0] *= 6
    x[:, ::7] = 0
    return x.reshape(rows, blocks * ACT_BLOCK)[:, :in_features].contiguous().to(dtype)


def checked_on(run, bits: int, group_size: int, in_features: int, dtype: torch.dtype, act_quantized: bool,
               name: str, device="cpu", rows: tuple[int, ...] = CHECK_ROWS, weight_rounded: bool = False) -> bool:
    """Whether `run(x, qw)` stays within the bound on probe weights of this format and input size
    (with and without mins where the format allows both), for each row count in `rows`.
    LLMRUN_FAIL_CHECKS=`name` fails it on purpose."""
    if check_forced_to_fail(name):
        return False
    generator = torch.Generator().manual_seed(in_features * 131 + group_size * 7 + bits)
    for with_mins in ((True,) if bits == 4 else (True, False)):
        qw = probe_weight(bits, group_size, PROBE_OUT, in_features, with_mins, generator)
        on_device = qw.to(device)
        for num_rows in rows:
            x = probe_inputs(num_rows, in_features, torch.float32, generator)
            largest = max(float((x.abs() @ term_magnitudes(part).float().T).max())  # kept well inside the
                          for _, part in output_slices(qw))  # dtype's range (float16)
            x = (x * min(1.0, torch.finfo(dtype).max / 16 / largest)).to(dtype)
            if not within_quant_bound(run(x.to(device), on_device), x, qw, act_quantized, weight_rounded):
                return False
    return True
