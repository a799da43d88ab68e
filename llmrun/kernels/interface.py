"""Fused decoder kernels: the layer shape they need, their shared interface and self-check, and
the choice of kernel set per device (C on the CPU, kernels/native.py; Triton on CUDA, gpu_kernels.py).

A kernel set is used by a decoder only after `check()` ran it against the ATen ops it replaces on
the decoder's own shape and dtype. LLMRUN_NO_NATIVE=1 keeps ATen everywhere; LLMRUN_FAIL_CHECKS
names checks to fail on purpose (tests simulate CPUs where a kernel's sums differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from llmrun import settings

CHECK_ROWS = (1, 3, 16)  # rows the self-check tries: decode of one and a few sequences, a full batch


@dataclass(frozen=True)
class LayerShape:
    """What the kernels need to know of a decoder layer."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    intermediate_size: int = 0     # the MLP's width, for the fused SiLU·mul
    silu: bool = False             # whether the MLP's activation is SiLU


def fused_kernels(dtype: torch.dtype, device: torch.device, shape: LayerShape) -> Optional["FusedKernels"]:
    """The kernel set for a decoder on `device` that passed its self-check, or None (use ATen)."""
    if settings.LLMRUN_NO_NATIVE.is_on():
        return None
    if device.type == "cuda":
        from llmrun.kernels.gpu_kernels import TritonKernels

        return TritonKernels.for_decoder(dtype, device, shape)
    if device.type == "cpu":
        from llmrun.kernels.native import NativeKernels

        return NativeKernels.for_decoder(dtype, device, shape)
    return None


def check_forced_to_fail(name: str) -> bool:
    """Whether LLMRUN_FAIL_CHECKS (comma-separated: `gemv`, `layer`) names this self-check: it then
    fails as it would on a CPU whose reference sums in another order, and the kernel stays off."""
    return name in settings.LLMRUN_FAIL_CHECKS.words()


class FusedKernels:
    """What decoders call (add_rms_norm, rope_qkv, silu_mul, attend, the matmuls, and when each may run), and
    the self-check against ATen every kernel set passes before use. Subclasses set `dtype`,
    `device` and `shape`, and say how close a fused norm must be (`norms_agree`)."""

    name = ""  # the kind of kernels, for reports: "C", "Triton"
    layer = None  # a whole decode layer in one call where the set has one (kernels/native_layer.py)
    dtype: torch.dtype
    device: torch.device
    shape: LayerShape

    def usable(self, num_rows: int) -> bool:
        return True

    def can_silu_mul(self, num_rows: int) -> bool:
        return False

    def can_attend(self, meta, softcap) -> bool:
        return False

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x @ weight.T (+ bias): layers.linear, unless a kernel set has a faster matmul for it."""
        from llmrun.model.layers import linear

        return linear(x, weight, bias)

    def norm_linear(self, hidden: torch.Tensor, delta: Optional[torch.Tensor], norm_weight: torch.Tensor,
                    weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, rms_norm(hidden + delta) * norm_weight @ weight.T (+ bias)): the norm
        before a layer's input projection; a kernel set may run both in one kernel."""
        hidden, x = self.add_rms_norm(hidden, delta, norm_weight)
        return hidden, self.linear(x, weight, bias)

    def linear_residual(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        hidden: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """An output projection and the residual stream: (hidden, x @ weight.T) with the add left
        to the next norm_linear or add_rms_norm, or (hidden + x @ weight.T, None) where a kernel
        set adds it in the matmul's kernel."""
        return hidden, self.linear(x, weight, bias)

    def norms_agree(self, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        return torch.equal(actual, expected)

    def describe(self) -> dict:
        """What this kernel set runs, for reports (`llmrun bench`)."""
        return {"set": self.name, "silu_mul": self.can_silu_mul(1)}

    # -- the self-check ----------------------------------------------------------------------------
    def check(self) -> bool:
        """The add + RMSNorm and RoPE + K/V kernels against the ATen ops they replace, on random
        data of this shape and dtype."""
        generator = torch.Generator().manual_seed(0)
        return all(self._norm_matches(generator, rows, scale) and self._rope_matches(generator, rows)
                   for rows, scale in zip(CHECK_ROWS, (0.05, 1.0, 40.0)))

    def _randn(self, generator, *size, scale=1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * scale).to(self.dtype).to(self.device)

    def _norm_matches(self, generator, rows: int, scale: float) -> bool:
        from llmrun.model.layers import rms_norm

        size, eps = self.shape.hidden_size, self.shape.eps
        hidden, delta = self._randn(generator, rows, size, scale=scale), self._randn(generator, rows, size, scale=scale)
        weight = self._randn(generator, size, scale=0.5)
        summed, normed = self.add_rms_norm(hidden, delta, weight)
        alone = self.add_rms_norm(hidden, None, weight)[1]
        return (torch.equal(summed, hidden + delta) and self.norms_agree(normed, rms_norm(hidden + delta, weight, eps))
                and self.norms_agree(alone, rms_norm(hidden, weight, eps)))

    def _rope_matches(self, generator, rows: int) -> bool:
        from llmrun.model.rope import apply_rope

        heads, kv_heads, dim = self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim
        qkv = self._randn(generator, rows, (heads + 2 * kv_heads) * dim)
        angles = torch.rand(rows, 1, dim // 2, generator=generator) * 6.3
        cos = torch.cat((angles.cos(), angles.cos()), -1).to(self.dtype).to(self.device)  # [rows, 1, dim]
        sin_folded = torch.cat((-angles.sin(), angles.sin()), -1).to(self.dtype).to(self.device)
        k_pool, v_pool = self._randn(generator, rows + 5, kv_heads, dim), self._randn(generator, rows + 5, kv_heads, dim)
        slots = torch.randperm(rows + 5, generator=generator)[:rows].to(self.device)
        q = self.rope_qkv(qkv, cos, sin_folded, k_pool, v_pool, slots)
        qk = apply_rope(qkv[:, : (heads + kv_heads) * dim].view(rows, -1, dim), cos, sin_folded)
        v = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
        return (torch.equal(q, qk[:, :heads]) and torch.equal(k_pool[slots], qk[:, heads:])
                and torch.equal(v_pool[slots], v))

    def _silu_mul_matches(self) -> bool:
        """SiLU·mul bit for bit against F.silu(gate) * up, on views into one matmul's output (as
        a fused gate/up weight gives) and on contiguous halves."""
        import torch.nn.functional as F

        generator = torch.Generator().manual_seed(1)
        n = self.shape.intermediate_size
        for rows in CHECK_ROWS:
            gate, up = self._randn(generator, rows, 2 * n, scale=6.0).chunk(2, dim=-1)
            for g, u in ((gate, up), (gate.contiguous(), up.contiguous())):
                if not torch.equal(self.silu_mul(g, u), F.silu(g) * u):
                    return False
        return True

    # the kernels themselves (each subclass)
    def add_rms_norm(self, hidden, delta, weight):
        raise NotImplementedError

    def rope_qkv(self, qkv, cos, sin_folded, k_pool, v_pool, slots):
        raise NotImplementedError

    def silu_mul(self, gate, up):
        raise NotImplementedError


def within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> bool:
    """Whether every value is within `ulps` units in the last place (of the dtype) of the expected one."""
    gap = (actual.double() - expected.double()).abs()
    return bool((gap <= ulps * _ulp(expected)).all())


def _ulp(values: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each value (of its magnitude's binade; the smallest normal's
    for zero and subnormals)."""
    info = torch.finfo(values.dtype)
    magnitude = values.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps
