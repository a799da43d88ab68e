"""Quantized matmuls on the CPU (kernels/quant_kernels.c): decode steps in C over the packed weights, prompt
chunks as a GEMM over the weight dequantized once per call.

Decode steps (up to DECODE_ROWS rows) run in C straight from the packed int4/int8 weight, so a token
reads the compressed bytes once: bf16 rows are quantized to int8 per block of 32 inputs and
multiplied with AVX-512 VNNI integer dot products; float32 rows stay float32 (the weight dequantized
in registers), within float32 rounding of the reference. ATen's `_weight_int4pack_mm_for_cpu` was the
faster int4 matmul in isolation here, but needs a repacked second copy of each weight and bf16
scales, and cannot run inside the bf16 layer in one C call (docs/performance.md); its int8 kernel was
slower than this one. Each weight format, input size and dtype is checked against the reference
(kernels/quant_check.py) before the kernel takes it; a failed check, a CPU without AVX-512 VNNI (or
ATen held below AVX-512), no compiler, or a format the kernel does not read (an int8 group that is not
16, 32 or a multiple of 64, inputs not a multiple of 64) runs the prompt path.

Where the CPU has AMX int8 (and ONEDNN_MAX_CPU_ISA leaves AMX on), bf16 decode steps of several rows
(`spec.cpu_amx_rows`: 8, or 4 for int8 weights no cache holds, by measurement) take each unit's
integer sum from AMX tiles (kernels/quant_amx_int.c) and then the VNNI kernel's float steps in its order: a row's bits are those it has alone (tested), at a fraction of the
work the VNNI kernel spends on every weight row and activation row.

Longer bf16 forwards (prompt chunks) run the AMX GEMM (kernels/quant_amx.c) where the CPU has AMX:
the weight dequantized 32 output rows at a time (format.dequantize's values rounded once to bf16)
into a buffer the caches hold and multiplied with AMX bf16 tiles, checked like the decode kernel
(the bound adds the weight's rounding to bf16). Without AMX they run the VNNI GEMM
(kernels/quant_gemm_vnni.c): the activations rounded to int8 per block of 32 as in a decode step,
multiplied in integers by the packed weight laid out 16 outputs a vector, checked like the decode
kernel (~2x a bf16 GEMM's speed on such a CPU, which the dequantizing path could not reach). A row's
bits do not depend on the other rows of its call. Elsewhere (float32 rows, no VNNI, int8 groups of
16, a failed check) the weight is dequantized once (in C, one pass, to the run dtype) and ATen's GEMM
runs over it. Within `sharing_dequantized` (prompt chunks of
one step run layer by layer) a layer's weights are dequantized (for the AMX GEMM: tiled) once for
all the step's chunks and the GEMM reads them from there (the same values, so the same bits).
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from functools import cached_property
from typing import Callable, Optional

import torch

from llmrun.kernels.interface import check_forced_to_fail
from llmrun.kernels.clib import aten_runs_avx512
from llmrun.kernels.quant import QuantMatmul, quant_linear, quant_parts
from llmrun.kernels.quant_check import checked_on
from llmrun.kernels.quant_layer import QuantLayer
from llmrun.kernels.quant_library import amx_allowed, load_quant_library
from llmrun.model.layers import linear
from llmrun.quant.format import QuantWeight, chunk_rows, row_slices
from llmrun.quant.spec import CPU_DECODE_ROWS, cpu_amx_rows

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
DECODE_ROWS = CPU_DECODE_ROWS  # forwards of up to this many rows run the integer kernel; more dequantize
GEMM_CHECK_ROWS = (17, 70)  # the AMX GEMM's check: part-filled tiles of rows, an odd number of them
CHUNK = 64  # inputs per step of the kernel's inner loop


def kernel_reads(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the C kernel reads this format: inputs in steps of 64, groups that tile those steps."""
    return in_features % CHUNK == 0 and (group_size == 32 or group_size % CHUNK == 0 or (group_size, bits) == (16, 8))


class CpuQuantMatmul(QuantMatmul):
    """quant_linear on the CPU: the VNNI kernel for decode steps where its check passed, a GEMM over
    the weight dequantized in C for prompt chunks (the reference where the library is absent)."""

    name = "C int8-activation VNNI"

    def __init__(self, load_library: Callable[[], Optional[ctypes.CDLL]] = load_quant_library):
        self._load_library = load_library  # called on the first quantized matmul: float runs never build it
        self._checked: dict[tuple, bool] = {}  # (bits, group, in, dtype), ("amx", bits, group, in) -> it passed
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._scratch_bf16 = torch.empty(0, dtype=torch.bfloat16)  # the AMX GEMM's tiles of weights
        self.ran = False  # whether a decode step ran the kernel (for reports)
        self.gemm_ran = False  # whether a prompt chunk ran the AMX GEMM
        self.amx_ran = False  # whether a decode step took its integer sums from AMX tiles
        self.vnni_gemm_ran = False  # whether a prompt chunk ran the VNNI GEMM
        self._shared: Optional[dict] = None  # (id, form) -> (weight, its form) inside sharing_dequantized()

    @cached_property
    def lib(self) -> Optional[ctypes.CDLL]:
        return self._load_library()

    @cached_property
    def vnni(self) -> bool:
        """Whether the VNNI kernel may run here: built, the CPU has the instructions, ATen runs AVX-512."""
        return self.lib is not None and aten_runs_avx512() and bool(self.lib.quant_supported())

    @cached_property
    def amx(self) -> bool:
        """Whether the AMX GEMM may run prompt chunks here: built, the CPU has AMX bf16 and Linux lets
        this process use it, and ONEDNN_MAX_CPU_ISA, where it keeps oneDNN off AMX, keeps it off too."""
        return (self.lib is not None and hasattr(self.lib, "quant_gemm_amx") and amx_allowed()
                and bool(self.lib.quant_amx_ready()))

    @cached_property
    def amx_int(self) -> bool:
        """Whether decode steps of `cpu_amx_rows` rows or more may take their integer sums from AMX int8
        tiles here (quant_amx_int.c: the VNNI kernel's bits): as `amx`, with AMX's int8 instructions
        (and like it, off where ONEDNN_MAX_CPU_ISA keeps oneDNN below AMX, or with LLMRUN_FAIL_CHECKS=amx)."""
        return (self.lib is not None and hasattr(self.lib, "quant_matmul_amx") and amx_allowed()
                and not check_forced_to_fail("amx") and bool(self.lib.quant_amx_int_ready()))

    def linear(self, x: torch.Tensor, qw: QuantWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not (x.dtype in DTYPES and x.dim() == 2 and x.stride(1) == 1 and self.lib is not None
                and all(t.is_contiguous() and t.device.type == "cpu" for t in quant_parts(qw))):
            return quant_linear(x, qw, bias)
        if x.shape[0] <= DECODE_ROWS and self.kernel_checked(qw.bits, qw.group_size, qw.in_features, x.dtype):
            out = self.matmul(x, qw)
            self.ran = True
            return out if bias is None else out + bias
        if x.dtype == torch.bfloat16 and self.gemm_checked(qw.bits, qw.group_size, qw.in_features):
            self.gemm_ran = True  # (inside sharing_dequantized, over the layer's weight tiled once)
            return self.gemm(x, qw, bias, None if self._shared is None else self._kept(qw, "amx", self.amx_tiles))
        if x.dtype == torch.bfloat16 and self.vnni_gemm_checked(qw.bits, qw.group_size, qw.in_features):
            self.vnni_gemm_ran = True
            out = self.vnni_gemm(x, qw)
            return out if bias is None else out + bias
        if self._shared is None and x.shape[0] <= DECODE_ROWS:  # a decode step the kernel does not read
            return self._piecewise(x, qw, bias)
        return linear(x, self._dequantized_for_chunk(qw, x.dtype), bias)

    def _piecewise(self, x: torch.Tensor, qw: QuantWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x @ W.T (+ bias) with W dequantized `chunk_rows` outputs at a time (each output's sum its own):
        a decode step whose format or CPU the kernel does not take (no AVX-512 VNNI, a failed check)
        never holds a whole weight in the run dtype, which for an output head (SmolLM2's: 57 MB in bf16)
        is more than a plan reserves beside the model for decode steps."""
        rows = min(chunk_rows(qw.in_features), qw.out_features)
        piece = torch.empty((rows, qw.in_features), dtype=x.dtype)  # one buffer for every piece
        outs = [linear(x, self.dequantized(part, x.dtype, piece[: part.out_features]),
                       None if bias is None else bias[start : start + part.out_features])
                for start, part in row_slices(qw, rows)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @contextmanager
    def sharing_dequantized(self):
        """Within the scope (one layer of a step's forwards run in lockstep), a weight dequantized
        for one prompt chunk serves the next: a layer's weights are dequantized once a step, not once
        a chunk. What was kept (at most one layer's matrices; the plan counts them) goes at the end."""
        self._shared = {}
        try:
            yield
        finally:
            self._shared = None

    def _dequantized_for_chunk(self, qw: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
        if self._shared is None:
            return self.dequantized(qw, dtype)
        return self._kept(qw, dtype, lambda weight: self.dequantized(weight, dtype))

    def _kept(self, qw: QuantWeight, form, make: Callable[[QuantWeight], torch.Tensor]) -> torch.Tensor:
        """`make(qw)`, kept within sharing_dequantized for the next chunk (per weight and form)."""
        key = (id(qw), form)
        kept = self._shared.get(key)
        if kept is None or kept[0] is not qw:
            kept = self._shared[key] = (qw, make(qw))  # (qw held: its id stays its own)
        return kept[1]

    def kernel_checked(self, bits: int, group_size: int, in_features: int, dtype: torch.dtype) -> bool:
        """Whether the VNNI kernel runs this format, input size and dtype: checked once each."""
        key = (bits, group_size, in_features, dtype)
        if key not in self._checked:
            self._checked[key] = (self.vnni and kernel_reads(bits, group_size, in_features)
                                  and checked_on(self.matmul, bits, group_size, in_features, dtype,
                                                 act_quantized=dtype == torch.bfloat16, name="quant"))
        return self._checked[key]

    def rows_alone(self, fmt, dtype: torch.dtype) -> bool:
        """Whether decode steps (up to DECODE_ROWS rows) of a weight in this format give each row its
        bits alone: where the C kernel runs it (bf16 rows: the same unit sums and float steps whatever
        the company, VNNI or AMX; float32 rows: each row's own sums)."""
        return dtype in DTYPES and self.kernel_checked(fmt.bits, fmt.group_size, fmt.in_features, dtype)

    def gemm_checked(self, bits: int, group_size: int, in_features: int) -> bool:
        """Whether the AMX GEMM runs bf16 rows of this format and input size: checked once each."""
        key = ("amx", bits, group_size, in_features)
        if key not in self._checked:
            self._checked[key] = (self.amx and in_features % 32 == 0 and group_size % (32 if bits == 4 else 16) == 0
                                  and checked_on(self.gemm, bits, group_size, in_features, torch.bfloat16,
                                                 act_quantized=False, weight_rounded=True, name="amx",
                                                 rows=GEMM_CHECK_ROWS))
        return self._checked[key]

    def vnni_gemm_checked(self, bits: int, group_size: int, in_features: int) -> bool:
        """Whether the VNNI GEMM (quant_gemm_vnni.c) runs bf16 prompt rows of this format and input
        size: units of 32 (not int8 groups of 16), checked once each."""
        key = ("vnni_gemm", bits, group_size, in_features)
        if key not in self._checked:
            self._checked[key] = (self.vnni and group_size != 16 and kernel_reads(bits, group_size, in_features)
                                  and checked_on(self.vnni_gemm, bits, group_size, in_features, torch.bfloat16,
                                                 act_quantized=True, name="vnni_gemm", rows=GEMM_CHECK_ROWS))
        return self._checked[key]

    def vnni_gemm(self, x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
        """x [rows, in] (bf16) @ W.T in bf16 by the VNNI GEMM: int8 activations per block of 32 (the
        decode kernel's terms), 16 outputs a lane vector, the weight read packed."""
        rows, k = x.shape
        threads = torch.get_num_threads()
        need = self.lib.quant_gemm_vnni_scratch(rows, k, qw.group_size, threads)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8)
        out = torch.empty((rows, qw.out_features), dtype=torch.bfloat16)
        mins = None if qw.mins is None else qw.mins.data_ptr()
        self.lib.quant_gemm_vnni(x.data_ptr(), x.stride(0), rows, k, qw.qweight.data_ptr(), qw.scales.data_ptr(),
                                 mins, qw.out_features, qw.bits, qw.group_size, out.data_ptr(), out.stride(0),
                                 self._scratch.data_ptr(), threads)
        return out

    def gemm(self, x: torch.Tensor, qw: QuantWeight, bias: Optional[torch.Tensor] = None,
             tiled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [rows, in] (bf16) @ W.T (+ bias) in bf16 by AMX tiles (quant_amx.c): the weight dequantized
        32 output rows at a time, or read from `tiled` (`amx_tiles`: the same values laid out once);
        the same bits either way."""
        rows, k = x.shape
        threads = torch.get_num_threads()
        need = self.lib.quant_amx_scratch(rows, k, threads) + 32  # (and room to align to 64 bytes)
        if self._scratch_bf16.numel() < need:
            self._scratch_bf16 = torch.empty(need, dtype=torch.bfloat16)
        out = torch.empty((rows, qw.out_features), dtype=torch.bfloat16)
        fused_bias = bias is not None and bias.dtype == torch.bfloat16 and bias.is_contiguous()
        mins = None if qw.mins is None else qw.mins.data_ptr()
        failed = self.lib.quant_gemm_amx(x.data_ptr(), x.stride(0), rows, k, qw.qweight.data_ptr(),
                                         qw.scales.data_ptr(), mins, qw.bits, qw.group_size,
                                         None if tiled is None else tiled.data_ptr(), qw.out_features,
                                         bias.data_ptr() if fused_bias else None, out.data_ptr(), out.stride(0),
                                         (self._scratch_bf16.data_ptr() + 63) // 64 * 64, threads)
        if failed:
            raise RuntimeError("the AMX GEMM cannot run here (gemm_checked decides where it may)")
        return out if bias is None or fused_bias else out + bias

    def amx_tiles(self, qw: QuantWeight) -> torch.Tensor:
        """The weight dequantized to bf16 in the AMX GEMM's tile layout (outputs in blocks of 16)."""
        tiled = torch.empty(-(-qw.out_features // 16) * 16 * qw.in_features, dtype=torch.bfloat16)
        mins = None if qw.mins is None else qw.mins.data_ptr()
        self.lib.quant_amx_tile_weight(qw.qweight.data_ptr(), qw.scales.data_ptr(), mins, qw.bits, qw.group_size,
                                       qw.out_features, qw.in_features, tiled.data_ptr(), torch.get_num_threads())
        return tiled

    def matmul(self, x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
        """x [rows, in] @ W.T in x's dtype: bf16 rows by the VNNI kernel (int8 activations per block
        of 32; from `cpu_amx_rows` rows, where they may run, its integer sums from AMX tiles: the same
        bits), float32 rows with the weight dequantized in registers (float32 throughout)."""
        rows, k = x.shape
        if x.dtype == torch.bfloat16 and rows >= cpu_amx_rows(qw.bits, qw.out_features, qw.in_features) \
                and self.amx_int:
            self.amx_ran = True
            return self.matmul_amx(x, qw)
        row_bytes = max(self.lib.quant_row_scratch_bytes(k, qw.group_size), 4 * k)  # int8 form, or k floats
        if self._scratch.numel() < rows * row_bytes:
            self._scratch = torch.empty(max(rows, DECODE_ROWS) * row_bytes, dtype=torch.uint8)
        out = torch.empty((rows, qw.out_features), dtype=x.dtype)
        mins = None if qw.mins is None else qw.mins.data_ptr()
        self.lib.quant_matmul(x.data_ptr(), x.stride(0), DTYPES[x.dtype], rows, k, qw.qweight.data_ptr(),
                              qw.scales.data_ptr(), mins, qw.out_features, qw.bits, qw.group_size, out.data_ptr(),
                              out.stride(0), self._scratch.data_ptr(), torch.get_num_threads())
        return out

    def matmul_amx(self, x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
        """x [rows <= 16, in] (bf16) @ W.T by AMX int8 tiles: the VNNI kernel's arithmetic, the same bits."""
        rows, k = x.shape
        threads = torch.get_num_threads()
        need = self.lib.quant_amx_int_scratch(k, qw.group_size, threads) + 64
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8)
        out = torch.empty((rows, qw.out_features), dtype=torch.bfloat16)
        mins = None if qw.mins is None else qw.mins.data_ptr()
        failed = self.lib.quant_matmul_amx(x.data_ptr(), x.stride(0), rows, k, qw.qweight.data_ptr(),
                                           qw.scales.data_ptr(), mins, qw.out_features, qw.bits, qw.group_size,
                                           out.data_ptr(), out.stride(0), (self._scratch.data_ptr() + 63) // 64 * 64,
                                           threads)
        if failed:
            raise RuntimeError("AMX int8 tiles cannot run here (amx_int decides where they may)")
        return out

    def dequantized(self, qw: QuantWeight, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight [out, in] in `dtype`: format.dequantize's float32 values (rounded once to bf16),
        written into `out` (contiguous, that shape and dtype) where given."""
        out = torch.empty((qw.out_features, qw.in_features), dtype=dtype) if out is None else out
        mins = None if qw.mins is None else qw.mins.data_ptr()
        self.lib.quant_dequantize(qw.qweight.data_ptr(), qw.scales.data_ptr(), mins, qw.out_features,
                                  qw.in_features, qw.bits, qw.group_size, out.data_ptr(), DTYPES[dtype],
                                  torch.get_num_threads())
        return out

    def layer_for(self, kernels) -> Optional[QuantLayer]:
        """A bf16 layer over quantized weights in one C call, for this C kernel set (quant_layer.py)."""
        return QuantLayer.for_kernels(kernels, self)

    def describe(self) -> dict:
        if not self._checked:
            return {}
        formats = sorted(f"int{key[0]} g{key[1]} k{key[2]}" for key, ok in self._checked.items()
                         if ok and isinstance(key[0], int))  # (the decode kernel's; not the GEMMs')
        return {"quant_matmul": self.name if self.vnni else "dequantize+GEMM", "quant_formats": formats,
                "quant_decode_kernel": self.ran, "quant_decode_tiles": "AMX int8" if self.amx_ran else None,
                "quant_prompt_kernel": ("AMX bf16, dequantized in blocks" if self.gemm_ran else
                                        "C int8-activation VNNI GEMM" if self.vnni_gemm_ran else "dequantize+GEMM")}
