"""Quantized matmuls on CUDA: one sequence's decode steps in a Triton GEMV that reads the packed int4/int8
weight from HBM and dequantizes it in registers; more rows (prompt chunks, batched decode) dequantize
the weight to the run dtype and run cuBLAS.

The GEMV follows kernels/gpu_gemv.py (one weight row a program, QUANT_BLOCK_K inputs at a time, its
own order of float32 sums): w = q * scale + min is formed in registers from the packed bytes and the
group's scale and min, so a step moves a quarter (int4) or half (int8) of the fp16 bytes. Checked on
each weight format and input size against the reference (kernels/quant.py, within the bound of
kernels/quant_check.py) before it runs; tests run it in Triton's CPU interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch

from llmrun.kernels.quant import QuantMatmul, quant_parts
from llmrun.kernels.quant_check import checked_on
from llmrun.model.layers import linear
from llmrun.quant.format import QuantWeight, dequantize

try:  # CUDA builds of torch depend on triton; CPU builds usually lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

GEMV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_BLOCK_K, QUANT_WARPS = 1024, 2  # as gpu_gemv.py's fp16 GEMV (not yet tuned on a GPU for packed weights)

if triton is not None:

    @triton.jit
    def _gemv_int4(x, qweight, scales, mins, out, K: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
        """out[row] = sum over k of (q * scale + min) * x[k] for one weight row: BLOCK bytes (2 * BLOCK
        inputs: the low nibble is input 2j, the high one 2j + 1) at a time, in float32."""
        row = tl.program_id(0).to(tl.int64)
        half: tl.constexpr = K // 2
        groups: tl.constexpr = K // GROUP
        j = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, half, BLOCK):
            b = start + j
            inside = b < half
            packed = tl.load(qweight + row * half + b, mask=inside, other=0, eviction_policy="evict_first")
            group = (2 * b) // GROUP
            scale = tl.load(scales + row * groups + group, mask=inside, other=0.0)
            low = (packed & 0x0F).to(tl.float32) * scale
            high = (packed >> 4).to(tl.float32) * scale
            low_x = tl.load(x + 2 * b, mask=inside, other=0.0).to(tl.float32)
            high_x = tl.load(x + 2 * b + 1, mask=inside, other=0.0).to(tl.float32)
            minimum = tl.load(mins + row * groups + group, mask=inside, other=0.0)
            acc += (low + minimum) * low_x + (high + minimum) * high_x
        tl.store(out + row, tl.sum(acc, axis=0).to(out.dtype.element_ty))

    @triton.jit
    def _gemv_int8(x, qweight, scales, mins, out, K: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_MINS: tl.constexpr):
        """out[row] = sum over k of (q * scale (+ min)) * x[k] for one int8 weight row, BLOCK inputs at a time."""
        row = tl.program_id(0).to(tl.int64)
        groups: tl.constexpr = K // GROUP
        k = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            ks = start + k
            inside = ks < K
            q = tl.load(qweight + row * K + ks, mask=inside, other=0, eviction_policy="evict_first")
            group = ks // GROUP
            w = q.to(tl.float32) * tl.load(scales + row * groups + group, mask=inside, other=0.0)
            if HAS_MINS:
                w += tl.load(mins + row * groups + group, mask=inside, other=0.0)
            acc += w * tl.load(x + ks, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + row, tl.sum(acc, axis=0).to(out.dtype.element_ty))


def quant_gemv(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """x [1, in] @ dequantize(qw).T in x's dtype by the Triton GEMV (contiguous parts on x's device)."""
    out = torch.empty((1, qw.out_features), dtype=x.dtype, device=x.device)
    if qw.bits == 4:
        block = min(QUANT_BLOCK_K // 2, triton.next_power_of_2(qw.in_features // 2))
        _gemv_int4[(qw.out_features,)](x, qw.qweight, qw.scales, qw.mins, out, K=qw.in_features, GROUP=qw.group_size,
                                       BLOCK=block, num_warps=QUANT_WARPS)
    else:
        block = min(QUANT_BLOCK_K, triton.next_power_of_2(qw.in_features))
        mins = qw.scales if qw.mins is None else qw.mins
        _gemv_int8[(qw.out_features,)](x, qw.qweight, qw.scales, mins, out, K=qw.in_features, GROUP=qw.group_size,
                                       BLOCK=block, HAS_MINS=qw.mins is not None, num_warps=QUANT_WARPS)
    return out


class TritonQuantMatmul(QuantMatmul):
    """quant_linear on CUDA: the Triton GEMV for one row where its check passed; else the weight
    dequantized to the run dtype and cuBLAS."""

    name = "Triton GEMV"

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._checked: dict[tuple, bool] = {}  # (bits, group, in, dtype) -> the GEMV passed its check
        self.ran = False

    @classmethod
    def for_device(cls, device: torch.device) -> QuantMatmul:
        return cls(device) if triton is not None else QuantMatmul()

    def linear(self, x: torch.Tensor, qw: QuantWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (x.shape[0] == 1 and x.dim() == 2 and x.is_contiguous() and bias is None
                and self.gemv_checked(qw.bits, qw.group_size, qw.in_features, x.dtype)
                and all(t.is_contiguous() and t.device == x.device for t in quant_parts(qw))):
            self.ran = True
            return quant_gemv(x, qw)
        return linear(x, dequantize(qw).to(x.device, x.dtype), bias)

    def gemv_checked(self, bits: int, group_size: int, in_features: int, dtype: torch.dtype) -> bool:
        key = (bits, group_size, in_features, dtype)
        if key not in self._checked:
            self._checked[key] = dtype in GEMV_DTYPES and checked_on(
                quant_gemv, bits, group_size, in_features, dtype, act_quantized=False, name="quant_gpu",
                device=self.device, rows=(1,))
        return self._checked[key]

    def describe(self) -> dict:
        if not self._checked:
            return {}
        formats = sorted(f"int{bits} g{group} k{k}" for (bits, group, k, _), ok in self._checked.items() if ok)
        return {"quant_matmul": self.name, "quant_formats": formats, "quant_decode_kernel": self.ran}
