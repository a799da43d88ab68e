"""The Triton GEMV for one sequence's 16-bit matmuls on CUDA, with the layer's RMSNorm before it or
its residual add after it folded in (kernels/gpu_kernels.py's TritonKernels calls it).

A batch-1 decode step reads every weight once; cuBLAS's GEMV-shaped kernels read a Phi-3-mini
step's weights at 73 % of an H100's bandwidth, this kernel at 82 % (scripts/gpu_gemv_probe.py:
one weight row a program, GEMV_BLOCK_K columns at a time, GEMV_WARPS warps, within 1.2 % of the
best of 112 configurations on every Phi-3 shape). It sums in its own order, not cuBLAS's.
"""

from __future__ import annotations

from typing import Optional

import torch

try:  # CUDA builds of torch depend on triton; CPU builds usually lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

GEMV_DTYPES = (torch.float16, torch.bfloat16)  # float32 keeps cuBLAS (and transformers' bits, near enough)
GEMV_BLOCK_K, GEMV_WARPS = 1024, 2  # within 1.2 % of the best of 112 configs on each Phi-3 shape (H100)

if triton is not None:

    @triton.jit
    def _gemv(x, weight, out, n, norm_weight, eps, residual, K: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr):
        """out[i] = sum over k of weight[i, k] * x[k], in float32, for BLOCK_N rows of a row-major
        weight and one row of x: each program streams its rows once, BLOCK_K at a time.
        NORM: x is first RMS-normed and scaled by norm_weight, rounded as gpu_kernels._add_rms_norm rounds
        (every program sums the squares itself: x is 2 K bytes, read from L2). RESIDUAL: out is
        residual + the product rounded to the dtype, added as gpu_kernels._add_rms_norm adds."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_starts = weight + rows.to(tl.int64)[:, None] * K
        cols = tl.arange(0, BLOCK_K)
        if NORM:
            squares = tl.zeros([BLOCK_K], dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                v = tl.load(x + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
                squares += v * v
            rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + cols
            if EVEN:
                w = tl.load(row_starts + ks[None, :], eviction_policy="evict_first")
                v = tl.load(x + ks)
            else:
                w = tl.load(row_starts + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < K), other=0.0,
                            eviction_policy="evict_first")
                v = tl.load(x + ks, mask=ks < K, other=0.0)
            if NORM:
                normed = (v.to(tl.float32) * rstd).to(v.dtype).to(tl.float32)
                scale = tl.load(norm_weight + ks, mask=ks < K, other=0.0).to(tl.float32)
                v = (scale * normed).to(v.dtype)
            acc += w.to(tl.float32) * v.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1).to(out.dtype.element_ty)
        if RESIDUAL:
            before = tl.load(residual + rows, mask=rows < n, other=0.0)
            y = (before.to(tl.float32) + y.to(tl.float32)).to(out.dtype.element_ty)
        tl.store(out + rows, y, mask=rows < n)


def gemv_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the GEMV takes x @ weight.T: one row of x, a 16-bit row-major weight tensor, no bias."""
    return (isinstance(weight, torch.Tensor) and bias is None and x.shape[0] == 1 and x.dim() == 2
            and weight.dim() == 2
            and weight.dtype in GEMV_DTYPES and x.dtype == weight.dtype and x.stride(1) == 1
            and weight.stride(1) == 1 and weight.stride(0) == weight.shape[1])


def gemv(x: torch.Tensor, weight: torch.Tensor, eps: float, norm_weight: Optional[torch.Tensor] = None,
         residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T [1, out] for a pair gemv_fits takes; with norm_weight, rms_norm(x) * norm_weight
    (eps) @ weight.T; with residual [1, out], residual + the product."""
    n, k = weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_k = min(GEMV_BLOCK_K, triton.next_power_of_2(k))
    _gemv[(n,)](x, weight, out, n, x if norm_weight is None else norm_weight, eps,
                out if residual is None else residual, K=k, BLOCK_N=1, BLOCK_K=block_k, EVEN=k % block_k == 0,
                NORM=norm_weight is not None, RESIDUAL=residual is not None, num_warps=GEMV_WARPS)
    return out
