"""Fused C kernels for the CPU decode step (native_kernels.c), used only where they match ATen.

Batch-1 decode on a CPU spends as much time in ~30 small ATen ops per layer as in the matmuls:
each op pays its dispatch, and the caches it needs were just flushed by the layer's weights. Two
kernels replace 20 of them: residual add + RMSNorm, and RoPE on q/k + the K/V cache writes.

The kernels are compiled on first use (~0.2 s) with the system C compiler into the user cache
directory (paths.cache_dir()/native, keyed by the source's hash) and loaded with ctypes. A
decoder uses them only after `NativeKernels.check` ran them against the ATen ops on its own shapes
and dtype with identical results, so greedy tokens never change. No compiler, a failed build, a
mismatch, or LLMRUN_NO_NATIVE=1: the ATen path runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_ROWS = 16  # decode steps; prefill chunks keep ATen's multi-threaded ops


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
    lib.add_rms_norm.restype = i32
    lib.rope_qkv.argtypes = [p, i64, p, p, p, p, p, p, i64, i64, i64, i64, i32]
    lib.rope_qkv.restype = None
    return lib


def _ptr(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


class NativeKernels:
    """The kernels bound to one decoder's shapes: hidden size, heads, head dim, dtype, eps."""

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype, hidden: int, eps: float, lanes: int):
        self.lib, self.dtype, self.code, self.hidden, self.eps, self.lanes = lib, dtype, DTYPES[dtype], hidden, eps, lanes
        self._scratch = torch.empty(2 * hidden, dtype=torch.float32)

    @classmethod
    def for_decoder(cls, dtype: torch.dtype, device: torch.device, hidden: int, eps: float,
                    q_heads: int, kv_heads: int, head_dim: int) -> Optional["NativeKernels"]:
        """Kernels that passed the self-check on these shapes, or None (use ATen)."""
        if device.type != "cpu" or dtype not in DTYPES or os.environ.get("LLMRUN_NO_NATIVE") == "1":
            return None
        lib = load_library()
        if lib is None:
            return None
        for lanes in (8, 16):  # the vector width of ATen's sum kernel on this CPU
            kernels = cls(lib, dtype, hidden, eps, lanes)
            if kernels.check(q_heads, kv_heads, head_dim):
                return kernels
        return None

    def add_rms_norm(self, hidden: torch.Tensor, delta: Optional[torch.Tensor],
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, rms_norm(hidden + delta) * weight); without delta, hidden is returned."""
        rows = hidden.shape[0]
        new_hidden = torch.empty_like(hidden) if delta is not None else hidden
        out = torch.empty_like(hidden)
        scratch = self._scratch
        self.lib.add_rms_norm(hidden.data_ptr(), _ptr(delta), _ptr(new_hidden) if delta is not None else None,
                              weight.data_ptr(), out.data_ptr(), rows, self.hidden, self.eps, self.code,
                              self.lanes, scratch.data_ptr(), scratch.data_ptr() + 4 * self.hidden)
        return new_hidden, out

    def rope_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor, k_pool: torch.Tensor,
                 v_pool: torch.Tensor, slots: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
        """q after RoPE [tokens, q_heads, head_dim]; k (after RoPE) and v written at their slots."""
        tokens = qkv.shape[0]
        q = torch.empty((tokens, q_heads, head_dim), dtype=qkv.dtype)
        self.lib.rope_qkv(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin_folded.data_ptr(), q.data_ptr(),
                          k_pool.data_ptr(), v_pool.data_ptr(), slots.data_ptr(), tokens, q_heads, kv_heads,
                          head_dim, self.code)
        return q

    def usable(self, rows: int) -> bool:
        return rows <= MAX_ROWS

    def check(self, q_heads: int, kv_heads: int, head_dim: int) -> bool:
        """Both kernels against the ATen ops they replace, on random data of these shapes."""
        from llmrun.model.layers import rms_norm
        from llmrun.model.rope import apply_rope

        generator = torch.Generator().manual_seed(0)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator) * scale).to(self.dtype)

        for rows, scale in ((1, 0.05), (3, 1.0), (MAX_ROWS, 40.0)):
            hidden, delta = randn(rows, self.hidden, scale=scale), randn(rows, self.hidden, scale=scale)
            weight = randn(self.hidden, scale=0.5)
            summed, normed = self.add_rms_norm(hidden, delta, weight)
            if not (torch.equal(summed, hidden + delta) and torch.equal(normed, rms_norm(hidden + delta, weight, self.eps))):
                return False
            if not torch.equal(self.add_rms_norm(hidden, None, weight)[1], rms_norm(hidden, weight, self.eps)):
                return False
            qkv = randn(rows, (q_heads + 2 * kv_heads) * head_dim)
            angles = torch.rand(rows, head_dim // 2, generator=generator) * 6.3
            cos = torch.cat((angles.cos(), angles.cos()), -1).to(self.dtype)
            sin = torch.cat((-angles.sin(), angles.sin()), -1).to(self.dtype)
            k_pool, v_pool = randn(rows + 5, kv_heads, head_dim), randn(rows + 5, kv_heads, head_dim)
            slots = torch.randperm(rows + 5, generator=generator)[:rows]
            q = self.rope_qkv(qkv, cos, sin, k_pool, v_pool, slots, q_heads, kv_heads, head_dim)
            qk = apply_rope(qkv[:, : (q_heads + kv_heads) * head_dim].view(rows, -1, head_dim),
                            cos.unsqueeze(1), sin.unsqueeze(1))
            v = qkv[:, (q_heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)
            if not (torch.equal(q, qk[:, :q_heads]) and torch.equal(k_pool[slots], qk[:, q_heads:])
                    and torch.equal(v_pool[slots], v)):
                return False
        return True
