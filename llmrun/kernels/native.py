"""Fused C kernels for the CPU decode step (native_kernels.c), used only where they match ATen.

Batch-1 decode on a CPU spends as much time in ~30 small ATen ops per layer as in the matmuls:
each op pays its dispatch, and the caches it needs were just flushed by the layer's weights. Three
kernels replace 22 of them: residual add + RMSNorm, RoPE on q/k + the K/V cache writes, and
SiLU(gate)·up (with ATen's own exp, taken from libtorch, so SiLU rounds exactly as ATen's does).
The same library carries the bf16 GEMV (native_gemv.c) and, for one sequence's float32 steps, a
whole layer in one call (native_layer.c, bound in native_layer.py).

The kernels are compiled on first use (under a second) with the system C compiler into the user
cache directory and loaded with ctypes (kernels/clib.py). A
decoder uses them only after `NativeKernels.check` ran them against the ATen ops on its own shapes
and dtype with identical results, so greedy tokens never change. No compiler, a failed build, a
mismatch, or LLMRUN_NO_NATIVE=1: the ATen path runs. The library is built alike for every x86-64
CPU (each kernel picks its instructions when it runs), so one cached build serves them all; its
AVX-512 code (the GEMV, the float32 layer) runs only where ATen runs its own AVX-512 kernels, so
ATEN_CPU_CAPABILITY=avx2 hides AVX-512 from both.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from llmrun.kernels.clib import FLAGS, GEMV_FLAGS, aten_exp_functions, aten_runs_avx512, build_library, c_compiler
from llmrun.kernels.interface import CHECK_ROWS, FusedKernels, Kernels, LayerShape, check_forced_to_fail
from llmrun.kernels.native_layer import NativeLayer, declare_layer
from llmrun.kernels.quant import PLAIN, QuantMatmul
from llmrun.kernels.verdicts import store_beside
from llmrun.model.layers import linear
from llmrun.weights.packing import pack_weight

SOURCE = Path(__file__).with_name("native_kernels.c")
GEMV_SOURCE = Path(__file__).with_name("native_gemv.c")
LAYER_SOURCE = Path(__file__).with_name("native_layer.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_ROWS = CHECK_ROWS[-1]  # decode steps; prefill chunks keep ATen's multi-threaded ops
GEMV_BLOCK = 32  # outputs per VNNI block of a oneDNN-packed weight (native_gemv.c)


@lru_cache(maxsize=1)
def load_library() -> Optional[ctypes.CDLL]:
    """The compiled kernels (built once per source version), or None where they cannot be built.
    With the bf16 GEMV (native_gemv.c) and the float32 layer (native_layer.c) where the compiler has
    OpenMP (the GEMV alone where the layer does not build), else without them."""
    compiler = c_compiler()
    if compiler is None:
        return None
    builds = (((SOURCE, GEMV_SOURCE, LAYER_SOURCE), FLAGS + GEMV_FLAGS), ((SOURCE, GEMV_SOURCE), FLAGS + GEMV_FLAGS),
              ((SOURCE,), FLAGS))
    for sources, flags in builds:
        lib = build_library(compiler, sources, flags)
        if lib is not None:
            return _declare(lib)
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    lib.add_rms_norm.argtypes = [p, p, p, p, p, i64, i64, f32, i32, i32, p, p]
    lib.add_rms_norm.restype = None
    lib.rope_qkv.argtypes = [p, i64, p, p, p, p, p, p, i64, i64, i64, i64, i32]
    lib.rope_qkv.restype = None
    if hasattr(lib, "silu_mul"):  # x86-64 builds only
        lib.silu_mul.argtypes = [p, i64, p, i64, p, i64, i64, i32, p, i32]
        lib.silu_mul.restype = None
    if hasattr(lib, "gemv_bf16_packed"):
        lib.gemv_bf16_packed.argtypes = [p, i64, p, p, i64, i64, i64, i64, p, i32]
        lib.gemv_bf16_packed.restype = None
    if hasattr(lib, "decode_layer_f32"):
        declare_layer(lib)
    return lib


def _ptr(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


class NativeKernels(FusedKernels):
    """The C kernels bound to one decoder's layer shape and dtype (the self-check: interface.py)."""

    name = "C"

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype, shape: LayerShape, lanes: int,
                 quant: QuantMatmul = PLAIN):
        if not 1 <= lanes <= 16:
            raise ValueError(f"lanes must be 1..16, not {lanes}")
        super().__init__(shape, dtype, "cpu", quant)
        self.lib, self.dtype_code, self.lanes = lib, DTYPES[dtype], lanes
        self.aten = Kernels(shape, dtype, "cpu", quant)  # what forwards of more rows than MAX_ROWS run
        self._scratch = torch.empty(2 * shape.hidden_size, dtype=torch.float32)  # h, then h * h
        self.exp_fn: Optional[int] = None  # set by for_decoder when the fused SiLU·mul checks out
        self.exp_width = 0
        self.avx512 = aten_runs_avx512()  # whether the AVX-512 kernels may run (the float32 layer reads it)
        self.gemv = (dtype == torch.bfloat16 and self.avx512 and hasattr(lib, "gemv_bf16_packed")
                     and bool(lib.gemv_supported()))
        self._gemv_shapes: dict[tuple[int, int], bool] = {}  # (out, in) -> passed its self-check
        self._gemv_weights: dict[int, tuple[torch.Tensor, Optional[int]]] = {}  # id -> (weight, its data or None)
        self._gemv_scratch = torch.empty(0, dtype=torch.float32)
        self.layer = None  # the float32 layer in one C call (kernels/native_layer.py), set by for_decoder
        self.quant_layer = None  # a bf16 layer over quantized weights in one C call (quant_layer.py), likewise

    @classmethod
    def for_decoder(cls, dtype: torch.dtype, device: torch.device, shape: LayerShape,
                    quant: QuantMatmul = PLAIN) -> Optional["NativeKernels"]:
        """Kernels that passed the self-check on this shape and dtype, or None (use ATen)."""
        if device.type != "cpu" or dtype not in DTYPES:
            return None
        lib = load_library()
        if lib is None:
            return None
        for lanes in (8, 16):  # the vector width of ATen's sum kernel on this CPU
            kernels = cls(lib, dtype, shape, lanes, quant)
            if kernels.check():
                kernels.pick_silu_mul()
                kernels.layer = NativeLayer.for_kernels(kernels)
                kernels.quant_layer = quant.layer_for(kernels)
                return kernels
        return None

    def pick_silu_mul(self) -> None:
        """Use the fused SiLU·mul with the exp width whose results equal ATen's, if any does."""
        if not (self.shape.silu and self.shape.intermediate_size and hasattr(self.lib, "silu_mul")):
            return
        for width, exp_fn in aten_exp_functions().items():
            self.exp_fn, self.exp_width = exp_fn, width
            if self._silu_mul_matches():
                return
        self.exp_fn, self.exp_width = None, 0

    def can_silu_mul(self, num_rows: int) -> bool:
        return self.exp_fn is not None and num_rows <= MAX_ROWS

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """F.silu(gate) * up for gate, up [rows, n] with unit stride along n (rows may be views
        into one fused gate/up output)."""
        rows, n = gate.shape
        out = torch.empty((rows, n), dtype=gate.dtype)
        self.lib.silu_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), rows, n,
                          self.dtype_code, self.exp_fn, self.exp_width)
        return out

    def for_rows(self, num_rows: int) -> Kernels:
        """This set for decode steps; ATen's ops for prompt chunks (their multi-threaded ops are faster)."""
        return self if num_rows <= MAX_ROWS else self.aten

    def whole_layer(self, hidden, rope, meta, scale, reference):
        """The float32 layer (kernels/native_layer.py), or a bf16 layer over quantized weights
        (kernels/quant_layer.py), in one C call for this step, where it runs."""
        if self.layer is not None:
            return self.layer.call(hidden, rope, meta, scale, reference)
        return None if self.quant_layer is None else self.quant_layer.call(hidden, rope, meta, scale, reference)

    def dense_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x @ weight.T (+ bias). One sequence's decode step in bf16 over a oneDNN-packed weight runs
        the C GEMV (native_gemv.c: oneDNN's sums in oneDNN's order, read at the memory's pace) where
        that weight's shape passed the GEMV self-check; anything else runs layers.linear. From two
        rows on, oneDNN's AMX kernel is faster (the GEMV's FMAs grow with the rows, AMX's do not)."""
        if not (weight.is_mkldnn and bias is None and self.gemv and x.shape[0] == 1 and x.dim() == 2
                and x.dtype == torch.bfloat16 and x.stride(1) == 1):
            return linear(x, weight, bias)
        entry = self._gemv_weights.get(id(weight))
        if entry is None:  # first use of this (resident, packed) weight: kept, so its id stays its own
            usable = weight.dtype == torch.bfloat16 and self._gemv_checked(weight)
            entry = self._gemv_weights[id(weight)] = (weight, torch.ops.mkldnn.data_ptr(weight) if usable else None)
        if entry[1] is None:
            return linear(x, weight, bias)
        return self._gemv(x, entry[1], *weight.shape)

    def describe(self) -> dict:
        """The kernel set, the weight shapes (out x in) one sequence's steps ran in the GEMV, and
        whether one sequence's float32 steps ran each layer in one C call (and, once a bf16 step over
        quantized weights did, that it ran its layers in one C call)."""
        shapes = [f"{n}x{k}" for (n, k), usable in self._gemv_shapes.items() if usable]
        ran_quant_layer = self.quant_layer is not None and self.quant_layer.ran
        return {**super().describe(), "gemv_shapes": shapes if self.gemv else None,
                "layer": self.layer is not None and self.layer.ran,
                **({"quant_layer": True} if ran_quant_layer else {})}

    def _gemv(self, x: torch.Tensor, weight_ptr: int, n: int, k: int) -> torch.Tensor:
        rows = x.shape[0]
        if self._gemv_scratch.numel() < rows * k:
            self._gemv_scratch = torch.empty(MAX_ROWS * k, dtype=torch.float32)
        out = torch.empty((rows, n), dtype=torch.bfloat16)
        self.lib.gemv_bf16_packed(x.data_ptr(), x.stride(0), weight_ptr, out.data_ptr(), n, rows, n, k,
                                  self._gemv_scratch.data_ptr(), torch.get_num_threads())
        return out

    def _gemv_checked(self, weight: torch.Tensor) -> bool:
        """Whether the GEMV may run on packed weights of this shape: its layout is the one the
        GEMV reads (the weight itself gives oneDNN's result), and on data built to expose any
        other order of summation (large terms that cancel exactly, small ones left over) it gives
        oneDNN's bits for every row count."""
        shape = tuple(weight.shape)
        if shape not in self._gemv_shapes:
            self._gemv_shapes[shape] = self._gemv_matches_remembered(weight) and self._gemv_reads(weight)
        return self._gemv_shapes[shape]

    def _gemv_matches_remembered(self, weight: torch.Tensor) -> bool:
        """`_gemv_matches` for this shape, its verdict remembered per machine and library build
        (kernels/verdicts.py): the check's probes cost ~0.2 s of every start otherwise."""
        if check_forced_to_fail("gemv"):
            return False
        n, k = weight.shape
        return store_beside(self.lib._name).verdict("gemv_matches", f"{n}x{k}", torch.get_num_threads(),
                                                    lambda: self._gemv_matches(weight))

    def _gemv_reads(self, weight: torch.Tensor) -> bool:
        x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        return torch.equal(self._gemv(x, torch.ops.mkldnn.data_ptr(weight), *weight.shape), linear(x, weight))

    def _gemv_matches(self, weight: torch.Tensor) -> bool:
        n, k = weight.shape
        if (n % GEMV_BLOCK or k % GEMV_BLOCK or torch.ops.mkldnn._nbytes(weight) != 2 * n * k
                or check_forced_to_fail("gemv")):
            return False
        generator = torch.Generator().manual_seed(2)
        probe_n = min(n, 4096)  # the layout repeats per block of 32 outputs; the sums are per output
        big = (torch.randn(probe_n, k // 4, generator=generator) * 3e4).to(torch.bfloat16).float()
        small = torch.randn(probe_n, k - 2 * (k // 4), generator=generator) * 0.01
        columns = torch.randperm(k, generator=generator)
        probe = torch.cat((big, -big, small), 1)[:, columns].to(torch.bfloat16)
        packed = pack_weight(probe)
        if not packed.is_mkldnn or torch.ops.mkldnn._nbytes(packed) != 2 * probe_n * k:
            return False
        pointer = torch.ops.mkldnn.data_ptr(packed)
        for rows in CHECK_ROWS:
            cancelling = (1 + torch.rand(rows, k, generator=generator)).to(torch.bfloat16)
            cancelling[0] = 1  # the large terms cancel exactly in row 0
            for x in (cancelling, torch.randn(rows, k, generator=generator).to(torch.bfloat16)):
                if not torch.equal(self._gemv(x, pointer, probe_n, k), linear(x, packed)):
                    return False
        return True

    def add_rms_norm(self, hidden: torch.Tensor, delta: Optional[torch.Tensor],
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, rms_norm(hidden + delta) * weight) for hidden [rows, hidden_size];
        without delta, hidden itself and its norm."""
        new_hidden = torch.empty_like(hidden) if delta is not None else None
        out = torch.empty_like(hidden)
        size, scratch = self.shape.hidden_size, self._scratch.data_ptr()
        self.lib.add_rms_norm(hidden.data_ptr(), _ptr(delta), _ptr(new_hidden), weight.data_ptr(), out.data_ptr(),
                              hidden.shape[0], size, self.shape.eps, self.dtype_code, self.lanes,
                              scratch, scratch + 4 * size)
        return (hidden if new_hidden is None else new_hidden), out

    def rope_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor, k_pool: torch.Tensor,
                 v_pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """q after RoPE [tokens, num_heads, head_dim] from qkv [tokens, q + k + v]; k after RoPE and
        v are written into the pools [slots, num_kv_heads, head_dim] at `slots` (int64)."""
        shape, num_tokens = self.shape, qkv.shape[0]
        q = torch.empty((num_tokens, shape.num_heads, shape.head_dim), dtype=qkv.dtype)
        self.lib.rope_qkv(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin_folded.data_ptr(), q.data_ptr(),
                          k_pool.data_ptr(), v_pool.data_ptr(), slots.data_ptr(), num_tokens, shape.num_heads,
                          shape.num_kv_heads, shape.head_dim, self.dtype_code)
        return q
