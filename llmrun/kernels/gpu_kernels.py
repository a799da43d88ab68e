"""Fused Triton kernels for the CUDA decoder (the GPU twin of kernels/native.py's C kernels).

Once CUDA graphs removed the launch cost (engine/graphs.py), a Phi-3-mini decode step on an H200
still ran ~1,000 kernels, ~27 small ones a layer around the four matmuls, each a few
microseconds. Four kernels replace most of them: residual add + RMSNorm, RoPE on q/k with the
K/V cache writes, SiLU(gate)·up, and decode attention straight from the paged pools. A fifth,
the GEMV (kernels/gpu_gemv.py), runs one sequence's matmuls closer to the memory bandwidth than
cuBLAS does.

Triton ships with every CUDA build of PyTorch, so this adds no package; where it cannot be
imported, a kernel fails its check, or LLMRUN_NO_NATIVE=1, the ATen path runs. Rounding: the add,
RoPE and SiLU·mul round each step to the run dtype exactly as the ATen ops do (the self-check asks
for identical bits; FMA contraction is off). RMSNorm sums squares in Triton's order, not ATen's,
so a normed value may differ by a unit or two in the last place, as under torch.compile; the
check (kernels/interface.py) bounds that (NORM_ULPS). Decode attention sums in its own order too.
"""

from __future__ import annotations

from typing import Optional

import torch

from llmrun import settings
from llmrun.kernels.interface import FusedKernels, LayerShape, within_ulps
from llmrun.kernels.gpu_gemv import GEMV_DTYPES, gemv, gemv_fits
from llmrun.kernels.quant import PLAIN, QuantMatmul
from llmrun.model.layers import linear

try:  # CUDA builds of torch depend on triton; CPU builds usually lack it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the install
    triton = None

LAUNCH = dict(enable_fp_fusion=False)  # a * b + c stays two roundings, as ATen computes it
PART_KEYS = 64  # keys per program of decode attention: longer contexts run parts in parallel, then join
NORM_ULPS = 4  # how far a normed value may be from ATen's, in units in the last place of the dtype

if triton is not None:

    @triton.jit
    def _add_rms_norm(hidden, delta, new_hidden, weight, out, row_stride, size, eps,
                      HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < size
        x = tl.load(hidden + row * row_stride + offsets, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(delta + row * row_stride + offsets, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            tl.store(new_hidden + row * size + offsets, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / size + eps)
        normed = (xf * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(weight + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + row * size + offsets, (w * normed).to(x.dtype), mask=mask)

    @triton.jit
    def _rope_qkv(qkv, qkv_stride, cos, sin_folded, q_out, k_pool, v_pool, slots,
                  NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads (each with its v head)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < HEAD_DIM
        rolled = (offsets + HEAD_DIM // 2) % HEAD_DIM  # x.roll(half)[i] = x[i - half], i.e. x[i + half]
        base = qkv + token * qkv_stride + head * HEAD_DIM
        x = tl.load(base + offsets, mask=mask, other=0.0)
        xr = tl.load(base + rolled, mask=mask, other=0.0)
        c = tl.load(cos + token * HEAD_DIM + offsets, mask=mask, other=0.0)
        s = tl.load(sin_folded + token * HEAD_DIM + offsets, mask=mask, other=0.0)
        first = (x.to(tl.float32) * c.to(tl.float32)).to(x.dtype)
        second = (xr.to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        rotated = (first.to(tl.float32) + second.to(tl.float32)).to(x.dtype)
        if head < NUM_HEADS:
            tl.store(q_out + (token * NUM_HEADS + head) * HEAD_DIM + offsets, rotated, mask=mask)
        else:
            kv_head = head - NUM_HEADS
            slot = tl.load(slots + token)
            dest = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM + offsets
            tl.store(k_pool + dest, rotated, mask=mask)
            v = tl.load(base + NUM_KV_HEADS * HEAD_DIM + offsets, mask=mask, other=0.0)
            tl.store(v_pool + dest, v, mask=mask)

    @triton.jit
    def _silu_mul(gate, up, out, gate_stride, up_stride, n, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
        row = tl.program_id(0)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        g = tl.load(gate + row * gate_stride + offsets, mask=mask, other=0.0)
        u = tl.load(up + row * up_stride + offsets, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        if LIBDEVICE:  # CUDA's expf and an IEEE division: ATen's x / (1 + exp(-x)), bit for bit
            silu = libdevice.div_rn(gf, 1.0 + libdevice.exp(-gf)).to(g.dtype)
        else:  # the interpreter has no libdevice: numpy's exp (the check then keeps ATen's SiLU)
            silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(out + row * n + offsets, (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)

    @triton.jit
    def _decode_attention(q, k_pool, v_pool, slots, visible, out, part_max, part_sum, part_acc, num_keys, scale,
                          NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PART: tl.constexpr, SINGLE: tl.constexpr):
        """One query token's attention for one head over one part of its keys (flash-decoding):
        keys are read from the pools through their slots, in chunks, with an online softmax."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        part = tl.program_id(2)
        kv_head = head // (NUM_HEADS // NUM_KV_HEADS)
        d = tl.arange(0, BLOCK_D)
        d_in = d < HEAD_DIM
        query = tl.load(q + (row * NUM_HEADS + head) * HEAD_DIM + d, mask=d_in, other=0.0).to(tl.float32)
        best = tl.full([1], float("-inf"), tl.float32)   # running max of the scores
        total = tl.zeros([1], tl.float32)                 # running sum of exp(score - best)
        acc = tl.zeros([1, BLOCK_D], tl.float32)          # running sum of exp(score - best) * v
        for start in range(0, PART, BLOCK_N):  # a fixed count: chunks past num_keys load nothing
            n = part * PART + start + tl.arange(0, BLOCK_N)
            in_range = n < num_keys
            seen = (tl.load(visible + row * num_keys + n, mask=in_range, other=0) != 0) & in_range
            slot = tl.load(slots + row * num_keys + n, mask=in_range, other=0)
            offsets = (slot[:, None] * NUM_KV_HEADS + kv_head) * HEAD_DIM + d[None, :]  # [BLOCK_N, BLOCK_D]
            tile_in = seen[:, None] & d_in[None, :]
            k = tl.load(k_pool + offsets, mask=tile_in, other=0.0).to(tl.float32)
            scores = tl.where(seen, tl.sum(k * query[None, :], axis=1) * scale, float("-inf"))[None, :]
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # nothing seen yet: keep zeros
            weights = tl.exp(scores - shift[:, None])  # [1, BLOCK_N]
            rescale = tl.exp(best - shift)
            v = tl.load(v_pool + offsets, mask=tile_in, other=0.0).to(tl.float32)
            total = total * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
            best = new_best
        if SINGLE:
            result = acc / total[:, None]
            tl.store(out + (row * NUM_HEADS + head) * HEAD_DIM + d[None, :], result.to(out.dtype.element_ty),
                     mask=d_in[None, :])
        else:
            index = (row * NUM_HEADS + head) * tl.num_programs(2) + part
            one = tl.arange(0, 1)
            tl.store(part_max + index + one, best)
            tl.store(part_sum + index + one, total)
            tl.store(part_acc + index * HEAD_DIM + d[None, :], acc, mask=d_in[None, :])

    @triton.jit
    def _combine_parts(part_max, part_sum, part_acc, out, num_parts, NUM_HEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
        """The parts of one head's attention joined: each weighted by exp(its max - the max)."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        p = tl.arange(0, BLOCK_P)
        p_in = p < num_parts
        d = tl.arange(0, BLOCK_D)
        d_in = d < HEAD_DIM
        base = (row * NUM_HEADS + head) * num_parts
        best = tl.load(part_max + base + p, mask=p_in, other=float("-inf"))
        sums = tl.load(part_sum + base + p, mask=p_in, other=0.0)
        weights = tl.where(p_in, tl.exp(best - tl.max(best, axis=0)), 0.0)  # a part saw no key: weight 0
        acc = tl.load(part_acc + (base + p)[:, None] * HEAD_DIM + d[None, :], mask=p_in[:, None] & d_in[None, :],
                      other=0.0)
        result = tl.sum(acc * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
        tl.store(out + (row * NUM_HEADS + head) * HEAD_DIM + d, result.to(out.dtype.element_ty), mask=d_in)


class TritonKernels(FusedKernels):
    """The kernels bound to one decoder's layer shape and dtype, on one CUDA device (or, with
    TRITON_INTERPRET=1, on CPU tensors: how tests check them without a GPU). The self-check is
    interface.py's, with RMSNorm allowed NORM_ULPS units in the last place."""

    name = "Triton"

    def __init__(self, dtype: torch.dtype, device: torch.device, shape: LayerShape, quant: QuantMatmul = PLAIN):
        super().__init__(shape, dtype, device, quant)
        self.fused_silu = False  # set by for_decoder once SiLU·mul gives ATen's bits

    @classmethod
    def for_decoder(cls, dtype: torch.dtype, device: torch.device, shape: LayerShape,
                    quant: QuantMatmul = PLAIN) -> Optional["TritonKernels"]:
        if triton is None:
            return None
        kernels = cls(dtype, device, shape, quant)
        try:
            if not kernels.check():
                return None
            kernels.fused_silu = shape.silu and shape.intermediate_size > 0 and kernels._silu_mul_matches()
        except Exception:  # a Triton that cannot build for this GPU: keep ATen
            return None
        return kernels

    def can_silu_mul(self, num_rows: int) -> bool:
        return self.fused_silu

    def add_rms_norm(self, hidden: torch.Tensor, delta: Optional[torch.Tensor],
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, rms_norm(hidden + delta) * weight) for contiguous hidden [rows, size];
        without delta, hidden itself and its norm."""
        rows, size = hidden.shape
        new_hidden = torch.empty_like(hidden) if delta is not None else None
        out = torch.empty_like(hidden)
        _add_rms_norm[(rows,)](hidden, hidden if delta is None else delta, out if new_hidden is None else new_hidden,
                               weight, out, size, size, self.shape.eps, HAS_DELTA=delta is not None,
                               BLOCK=triton.next_power_of_2(size), num_warps=_warps(size), **LAUNCH)
        return (hidden if new_hidden is None else new_hidden), out

    def rope_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor, k_pool: torch.Tensor,
                 v_pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """q after RoPE [tokens, num_heads, head_dim] from qkv [tokens, q + k + v] (unit stride in a
        row); k after RoPE and v go into the pools [slots, num_kv_heads, head_dim] at `slots`."""
        shape, num_tokens = self.shape, qkv.shape[0]
        q = torch.empty((num_tokens, shape.num_heads, shape.head_dim), dtype=qkv.dtype, device=qkv.device)
        grid = (num_tokens, shape.num_heads + shape.num_kv_heads)
        _rope_qkv[grid](qkv, qkv.stride(0), cos, sin_folded, q, k_pool, v_pool, slots, NUM_HEADS=shape.num_heads,
                        NUM_KV_HEADS=shape.num_kv_heads, HEAD_DIM=shape.head_dim,
                        BLOCK=triton.next_power_of_2(shape.head_dim), num_warps=1, **LAUNCH)
        return q

    def can_attend(self, meta, softcap) -> bool:
        """Whether decode attention reads the pools itself: static decode steps (their slots and
        masks are tensors, engine/graphs.py), without soft-capping."""
        return meta.decode_lens is not None and softcap is None

    def attend(self, q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, meta, scale: float) -> torch.Tensor:
        """Decode attention [rows, num_heads * head_dim] of q [rows, num_heads, head_dim] over the
        keys at meta.decode_slots [rows, max_keys] where meta.decode_mask is set, straight from the
        pools (no gathered copy of K/V); long contexts split into parts of PART_KEYS keys."""
        shape = self.shape
        rows, num_keys = meta.decode_slots.shape
        visible = meta.decode_mask.reshape(rows, num_keys).view(torch.uint8)
        out = torch.empty((rows, shape.num_heads * shape.head_dim), dtype=q.dtype, device=q.device)
        part = min(PART_KEYS, triton.next_power_of_2(num_keys))  # static steps: num_keys is a bucket of blocks
        num_parts = triton.cdiv(num_keys, part)
        scratch = (rows, shape.num_heads, num_parts)
        part_max = part_sum = part_acc = out  # unused by a single part
        if num_parts > 1:
            part_max = torch.empty(scratch, dtype=torch.float32, device=q.device)
            part_sum = torch.empty(scratch, dtype=torch.float32, device=q.device)
            part_acc = torch.empty((*scratch, shape.head_dim), dtype=torch.float32, device=q.device)
        block_d = triton.next_power_of_2(shape.head_dim)
        _decode_attention[(rows, shape.num_heads, num_parts)](
            q, k_slots, v_slots, meta.decode_slots, visible, out, part_max, part_sum, part_acc, num_keys, scale,
            NUM_HEADS=shape.num_heads, NUM_KV_HEADS=shape.num_kv_heads, HEAD_DIM=shape.head_dim, BLOCK_D=block_d,
            BLOCK_N=min(64, part), PART=part, SINGLE=num_parts == 1, num_warps=4)
        if num_parts > 1:
            _combine_parts[(rows, shape.num_heads)](part_max, part_sum, part_acc, out, num_parts,
                                                    NUM_HEADS=shape.num_heads, HEAD_DIM=shape.head_dim, BLOCK_D=block_d,
                                                    BLOCK_P=triton.next_power_of_2(num_parts), num_warps=1)
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """F.silu(gate) * up for gate, up [rows, n] with unit stride along n (views into one fused
        gate/up output allowed)."""
        rows, n = gate.shape
        out = torch.empty((rows, n), dtype=gate.dtype, device=gate.device)
        block = 1024
        _silu_mul[(rows, triton.cdiv(n, block))](gate, up, out, gate.stride(0), up.stride(0), n, BLOCK=block,
                                                  LIBDEVICE=not _interpreted(), num_warps=4, **LAUNCH)
        return out

    def norms_agree(self, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        return within_ulps(actual, expected, NORM_ULPS)

    def dense_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x @ weight.T (+ bias). One sequence's decode step over a 16-bit weight runs the Triton
        GEMV (kernels/gpu_gemv.py: on an H100 it read a Phi-3-mini step's weights in 2.94 ms against
        cuBLAS's 3.28, scripts/gpu_gemv_probe.py);
        more rows, float32 and biases run layers.linear (cuBLAS)."""
        if not gemv_fits(x, weight, bias):
            return linear(x, weight, bias)
        return gemv(x, weight, self.shape.eps)

    def norm_linear(self, hidden: torch.Tensor, delta: Optional[torch.Tensor], norm_weight: torch.Tensor,
                    weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The GEMV with the RMSNorm before it in the same kernel, where `hidden` is already summed."""
        if delta is not None or not gemv_fits(hidden, weight, bias):
            return super().norm_linear(hidden, delta, norm_weight, weight, bias)
        return hidden, gemv(hidden, weight, self.shape.eps, norm_weight=norm_weight)

    def linear_residual(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        hidden: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The GEMV with the residual add after it in the same kernel."""
        if not gemv_fits(x, weight, bias) or hidden.shape != (1, weight.shape[0]) or not hidden.is_contiguous():
            return super().linear_residual(x, weight, bias, hidden)
        return gemv(x, weight, self.shape.eps, residual=hidden), None

    def describe(self) -> dict:
        return {**super().describe(), "gemv": self.dtype in GEMV_DTYPES}


def _warps(size: int) -> int:
    return 4 if size <= 2048 else 8 if size <= 8192 else 16


def _interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (tests without a GPU), read at launch as Triton reads it."""
    return settings.TRITON_INTERPRET.text() == "1"
