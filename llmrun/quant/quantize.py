"""llmrun's quantizer: float weights -> QuantWeight (int8 symmetric; int4 asymmetric groups, fitted by
least squares, or with a calibration's importance of each input by weighted least squares over a
search of scales), and a checkpoint's compressed tensors written as one quantized safetensors file.

Scales and minimums are rounded to float16 first where float16 holds them as normal numbers (as GGUF
stores its d and m), and the integers are chosen against the rounded values: the file then stores
them in float16 exactly, and what is loaded is what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llmrun.quant.format import QuantWeight, pack_int4
from llmrun.quant.stored import QuantMetadata, TensorFormat, save_quantized, stored_tensors
from llmrun.quant.spec import QuantSpec, check_groups, compressed
from llmrun.weights.index import CheckpointIndex
from llmrun.weights.loader import PackedTensor, TensorFileReader

_HALF_NORMAL = 2.0**-14  # smallest normal float16: below it float16 would lose bits
_HALF_MAX = 65504.0
FIT_ROUNDS = 4  # least-squares rounds of the int4 fit (0: the plain min/max grid)
# the calibrated int4 fit's starting scales, as fractions of the min/max grid's (each refitted by WEIGHTED_ROUNDS)
SEARCH_SCALES = tuple(0.7 + 0.0225 * i for i in range(21))
WEIGHTED_ROUNDS = 2
IMPORTANCE_FLOOR = 1e-3  # of the mean importance, added to each input's: no group is left unweighted
QUANTIZER_VERSION = 3  # names quantize-on-load cache entries: bump when the values chosen change


@dataclass(frozen=True)
class Calibration:
    """Per checkpoint tensor name, the importance of each of its inputs (float32 [in]), and the text
    measured (quant/calibrate.py makes it)."""

    importance: dict[str, torch.Tensor]
    file: str  # the text's file name, for the store entry's description
    num_tokens: int

    @property
    def phrase(self) -> str:
        return f"calibrated on {self.file} ({self.num_tokens} tokens)"


def _half_rounded(values: torch.Tensor) -> torch.Tensor:
    """Each value rounded to float16 where that is a normal float16 (else kept): float32 out."""
    magnitude = values.abs()
    representable = (magnitude >= _HALF_NORMAL) & (magnitude <= _HALF_MAX)
    return torch.where(representable, values.to(torch.float16).to(torch.float32), values)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> QuantWeight:
    """Quantize a float [out, in] weight; the group must divide `in` (check_groups says so first).
    `importance` (float [in], a calibration's; int4 only) weighs each input's rounding errors."""
    out_features, in_features = weight.shape
    group = spec.group_for(in_features)
    w = weight.to(torch.float32).reshape(out_features, in_features // group, group)  # [out, groups, group]
    if spec.bits == 8:
        scales = _half_rounded(w.abs().amax(dim=-1) / 127.0)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
        q = torch.round(w / safe).clamp_(-127, 127).to(torch.int8).reshape(out_features, in_features)
        return QuantWeight(8, group, out_features, in_features, q, scales, None)
    if importance is None:
        scales, mins = _fit_int4(w)
        scales, mins = _half_rounded(scales), _half_rounded(mins)
    else:
        scales, mins = _fit_int4_weighted(w, importance.to(torch.float32).reshape(w.shape[1], group))
    q = _nearest(w, scales, mins)
    return QuantWeight(4, group, out_features, in_features, pack_int4(q.reshape(out_features, in_features)),
                       scales, mins)


def _nearest(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Each weight's nearest of the 16 levels min + q * scale (q = 0 where a group's scale is 0)."""
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
    q = torch.round((w - mins.unsqueeze(-1)) / safe).clamp_(0, 15)
    return torch.where(scales.unsqueeze(-1) > 0, q, torch.zeros_like(q)).to(torch.uint8)


def _fit_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and minimum per group [out, groups] of w [out, groups, group]: the min/max grid, then
    rounds of least squares (each group's best scale and min for its levels, then the nearest levels
    again), keeping each group's fit of least squared error. Outliers then cost their group less."""
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales, mins = (high - low) / 15.0, low
    best = (scales, mins, _squared_error(w, scales, mins))
    for _ in range(FIT_ROUNDS):
        scales, mins = _refit(w, scales, mins)
        best = _better(best, scales, mins, _squared_error(w, scales, mins))
    return best[0], best[1]


def _refit(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
           weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of least squares: each group's best scale and min for the nearest levels of the
    current ones (the squared errors weighted by `weights` [..., group] where given); a group with no
    such line of positive scale keeps its own."""
    q = _nearest(w, scales, mins).to(torch.float32)
    weigh = (lambda t: t) if weights is None else (lambda t: weights * t)  # noqa: E731
    n = torch.full_like(scales, w.shape[-1]) if weights is None else weights.sum(-1).expand_as(scales)
    sum_q, sum_qq = weigh(q).sum(-1), weigh(q * q).sum(-1)
    sum_w, sum_qw = weigh(w).sum(-1), weigh(q * w).sum(-1)
    det = n * sum_qq - sum_q * sum_q
    fitted = det > 0
    det = torch.where(fitted, det, torch.ones_like(det))
    new_scales = (n * sum_qw - sum_q * sum_w) / det
    fitted &= new_scales > 0
    scales = torch.where(fitted, new_scales, scales)
    return scales, torch.where(fitted, (sum_w - scales * sum_q) / n, mins)


def _better(best: tuple, scales: torch.Tensor, mins: torch.Tensor, error: torch.Tensor) -> tuple:
    """(scales, mins, error) of each group's better fit: `best`'s, or the new one where its error is less."""
    better = error < best[2]
    return (torch.where(better, scales, best[0]), torch.where(better, mins, best[1]),
            torch.where(better, error, best[2]))


def _squared_error(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                   weights: torch.Tensor | float = 1.0) -> torch.Tensor:
    q = _nearest(w, scales, mins).to(torch.float32)
    return (weights * (q * scales.unsqueeze(-1) + mins.unsqueeze(-1) - w) ** 2).sum(-1)


def _fit_int4_weighted(w: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and minimum per group [out, groups] of w [out, groups, group], float16-rounded, that make
    the importance-weighted squared error (importance [groups, group]) least among: the plain fit's,
    and grids of SEARCH_SCALES times the min/max grid's step centred on each group's range, each
    refitted by weighted least squares for its levels. The plain fit is a candidate, so no group ends
    worse (by this measure) than uncalibrated; a large input's weight is rounded more closely."""
    a = importance + IMPORTANCE_FLOOR * importance.mean()  # [groups, group], broadcast over the outputs
    scales, mins = _fit_int4(w)
    scales, mins = _half_rounded(scales), _half_rounded(mins)
    best = (scales, mins, _squared_error(w, scales, mins, a))
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    for fraction in SEARCH_SCALES:
        scales = (high - low) / 15.0 * fraction
        mins = (low + high) / 2 - 7.5 * scales
        for _ in range(WEIGHTED_ROUNDS):
            scales, mins = _refit(w, scales, mins, a)
        scales, mins = _half_rounded(scales), _half_rounded(mins)
        best = _better(best, scales, mins, _squared_error(w, scales, mins, a))
    return best[0], best[1]


def quantize_index(index: CheckpointIndex, spec: QuantSpec, path: Path, *, keep_floats: bool,
                   on_tensor: Callable[[int, int], None] = lambda done, total: None,
                   calibration: Calibration | None = None) -> QuantMetadata:
    """Write `path`: every tensor spec.compressed names quantized (the layers' matmuls as `spec` says,
    the output head as HEAD_SPEC), and with `keep_floats` the other tensors as they are, atomically.
    `on_tensor(done, total)` reports progress; `calibration` (quant/calibrate.py) weighs the int4 fits
    of the tensors it measured."""
    check_groups(index, spec)
    specs = compressed(index, spec)
    names = list(specs)
    kept = tuple(sorted(n for n in index.tensors if n not in specs))
    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, TensorFormat] = {}
    with TensorFileReader() as reader:
        for done, name in enumerate(names, 1):
            weight = _read(reader, index, name)
            importance = None if calibration is None else calibration.importance.get(name)
            qw = quantize_weight(weight, specs[name], importance if specs[name].bits == 4 else None)
            tensors.update(stored_tensors(name, qw))
            formats[name] = TensorFormat(qw.bits, qw.group_size, qw.out_features, qw.in_features)
            on_tensor(done, len(names))
        if keep_floats:
            for name in kept:  # in 16 bits: a float32 checkpoint's kept tensors become bfloat16
                tensor = _read(reader, index, name)
                tensors[name] = tensor.to(torch.bfloat16) if tensor.dtype == torch.float32 else tensor
    meta = QuantMetadata(formats, kept) if calibration is None else \
        QuantMetadata(formats, kept, f"quantized by llmrun, {calibration.phrase}")
    save_quantized(path, tensors, meta)
    return meta


def _read(reader: TensorFileReader, index: CheckpointIndex, name: str) -> torch.Tensor:
    from llmrun.weights.loader import torch_dtype

    info = index[name]
    return reader.load_packed(PackedTensor(name, (info,), info.shape), torch_dtype(info.dtype))
