"""Fused C kernels for the CPU decode step (native_kernels.c), used only where they match ATen.

Batch-1 decode on a CPU spends as much time in ~30 small ATen ops per layer as in the matmuls:
each op pays its dispatch, and the caches it needs were just flushed by the layer's weights. Three
kernels replace 22 of them: residual add + RMSNorm, RoPE on q/k + the K/V cache writes, and
SiLU(gate)·up (with ATen's own exp, taken from libtorch, so SiLU rounds exactly as ATen's does).

The kernels are compiled on first use (under a second) with the system C compiler into the user
cache directory (paths.cache_dir()/native, keyed by the source's hash) and loaded with ctypes. A
decoder uses them only after `NativeKernels.check` ran them against the ATen ops on its own shapes
and dtype with identical results, so greedy tokens never change. No compiler, a failed build, a
mismatch, or LLMRUN_NO_NATIVE=1: the ATen path runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from llmrun.model.fused import CHECK_ROWS, FusedKernels, LayerShape

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_ROWS = CHECK_ROWS[-1]  # decode steps; prefill chunks keep ATen's multi-threaded ops


@lru_cache(maxsize=1)
def load_library() -> Optional[ctypes.CDLL]:
    """The compiled kernels (built once per source version), or None where they cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    from llmrun.paths import cache_dir

    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    folder = cache_dir() / "native"
    library = folder / f"kernels-{key}.so"
    try:
        if not library.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                built = Path(scratch) / library.name
                subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, library)  # atomic: a half-written library is never loaded
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    lib.add_rms_norm.argtypes = [p, p, p, p, p, i64, i64, f32, i32, i32, p, p]
    lib.add_rms_norm.restype = None
    lib.rope_qkv.argtypes = [p, i64, p, p, p, p, p, p, i64, i64, i64, i64, i32]
    lib.rope_qkv.restype = None
    if hasattr(lib, "silu_mul"):  # x86-64 builds only
        lib.silu_mul.argtypes = [p, i64, p, i64, p, i64, i64, i32, p, i32]
        lib.silu_mul.restype = None
    return lib


@lru_cache(maxsize=1)
def aten_exp_functions() -> dict[int, int]:
    """ATen's vectorised float exp (Sleef's, exported by libtorch_cpu) by vector width: the exp
    inside `F.silu`, so a fused SiLU gives its bits. Only widths this CPU runs (AVX2, AVX-512)."""
    capability = torch.backends.cpu.get_cpu_capability()
    widths = (16, 8) if capability.startswith("AVX512") else (8,) if capability == "AVX2" else ()
    if not widths or sys.platform != "linux" or platform.machine() != "x86_64":
        return {}
    try:
        libtorch = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    except OSError:
        return {}
    found = {}
    for width in widths:
        symbol = getattr(libtorch, f"Sleef_expf{width}_u10", None)
        if symbol is not None:
            found[width] = ctypes.cast(symbol, ctypes.c_void_p).value
    return found


def _ptr(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


class NativeKernels(FusedKernels):
    """The C kernels bound to one decoder's layer shape and dtype (the self-check: fused.py)."""

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype, shape: LayerShape, lanes: int):
        if not 1 <= lanes <= 16:
            raise ValueError(f"lanes must be 1..16, not {lanes}")
        self.lib, self.dtype, self.dtype_code, self.shape, self.lanes = lib, dtype, DTYPES[dtype], shape, lanes
        self.device = torch.device("cpu")
        self._scratch = torch.empty(2 * shape.hidden_size, dtype=torch.float32)  # h, then h * h
        self.exp_fn: Optional[int] = None  # set by for_decoder when the fused SiLU·mul checks out
        self.exp_width = 0

    @classmethod
    def for_decoder(cls, dtype: torch.dtype, device: torch.device, shape: LayerShape) -> Optional["NativeKernels"]:
        """Kernels that passed the self-check on this shape and dtype, or None (use ATen)."""
        if device.type != "cpu" or dtype not in DTYPES:
            return None
        lib = load_library()
        if lib is None:
            return None
        for lanes in (8, 16):  # the vector width of ATen's sum kernel on this CPU
            kernels = cls(lib, dtype, shape, lanes)
            if kernels.check():
                kernels.pick_silu_mul()
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

    def usable(self, num_rows: int) -> bool:
        return num_rows <= MAX_ROWS

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
