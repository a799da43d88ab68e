"""The kernel interface: the operations a decoder layer is written in (`Kernels`, defined by ATen's
ops), the fused sets' primitives and their self-check (`FusedKernels`), and the layer shape they need.

A decoder states its layer's math over a `Kernels` handed to it (kernels/choose.py picks one per
device): ATen's ops, or a fused set (C on the CPU, kernels/native.py; Triton on CUDA,
kernels/gpu_kernels.py) that passed `check()` against the ATen ops it replaces on the decoder's own
shape and dtype. LLMRUN_FAIL_CHECKS names checks to fail on purpose (tests simulate CPUs where a
kernel's sums differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llmrun import settings
from llmrun.kernels.quant import PLAIN, QuantMatmul
from llmrun.model.attention import paged_attention, write_kv
from llmrun.model.layers import activation, gemma_rms_norm, linear, linear_halves, rms_norm
from llmrun.model.rope import apply_rope
from llmrun.quant.format import QuantWeight

CHECK_ROWS = (1, 3, 16)  # rows the self-check tries: decode of one and a few sequences, a full batch


@dataclass(frozen=True)
class LayerShape:
    """What kernels need to know of a decoder layer: its sizes, and which variant of each step of
    the math it runs (a fused set computes only the `fusable` ones; ATen's ops compute them all)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    intermediate_size: int = 0     # the MLP's width, for the fused SiLU·mul
    activation: str = "silu"       # the MLP's activation (a config's hidden_act)
    norm: str = "rms"              # "rms": x·rstd rounded, then × w (Llama); "gemma": x·rstd·(1 + w) in float32
    qk_norm: bool = False          # per-head norms of q and k before RoPE (Qwen3, Gemma 3)
    rotary_dim: int = 0            # dims of a head RoPE rotates (0: all)
    softcap: Optional[float] = None  # attention scores soft-capped (Gemma 2)
    sliding: bool = False          # some layers attend over a sliding window
    rope_tables: int = 1           # RoPE tables the layers use (Gemma 3: one per layer type)

    @property
    def silu(self) -> bool:
        return self.activation == "silu"

    @property
    def fusable(self) -> bool:
        """Whether the fused kernels compute this layer: Llama's RMSNorm, RoPE over whole heads, no q/k norms."""
        return self.norm == "rms" and not self.qk_norm and self.rotary_dim in (0, self.head_dim)

    @property
    def plain_llama(self) -> bool:
        """Whether this is Llama's layer exactly (what a whole layer in one call computes): fusable,
        SiLU, one RoPE table, no soft-capping or sliding windows."""
        return self.fusable and self.silu and self.softcap is None and not self.sliding and self.rope_tables == 1


def check_forced_to_fail(name: str) -> bool:
    """Whether LLMRUN_FAIL_CHECKS (comma-separated: `gemv`, `layer`) names this self-check: it then
    fails as it would on a CPU whose reference sums in another order, and the kernel stays off."""
    return name in settings.LLMRUN_FAIL_CHECKS.words()


class Kernels:
    """The operations a decoder layer is written in, for one layer shape and dtype on one device, as
    ATen computes them: the reference every fused set is checked against, and the set a decoder
    runs where none passed. Residual adds may be left pending: an op returns (hidden, delta) and the
    next `add_norm`/`norm_linear` adds delta to hidden before its norm. A matmul weight may be a
    QuantWeight (compressed int8/int4): `quant`, the device's quantized matmul, runs those."""

    name: Optional[str] = None  # the kind of kernels, for reports: "C", "Triton"; None: ATen's ops

    def __init__(self, shape: LayerShape, dtype: torch.dtype, device, quant: QuantMatmul = PLAIN):
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.quant = quant
        self.act = activation(shape.activation)
        self._norm = gemma_rms_norm if shape.norm == "gemma" else rms_norm

    def for_rows(self, num_rows: int) -> "Kernels":
        """The set a forward of `num_rows` tokens runs (a fused set may leave long prompts to ATen)."""
        return self

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._norm(x, weight, self.shape.eps)

    def add_norm(self, hidden: torch.Tensor, delta: Optional[torch.Tensor],
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, its norm × weight); without delta, hidden itself and its norm."""
        hidden = hidden if delta is None else hidden + delta
        return hidden, self.norm(hidden, weight)

    def linear(self, x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x @ weight.T (+ bias) for a weight tensor or a QuantWeight (run by `quant`)."""
        if isinstance(weight, QuantWeight):
            return self.quant.linear(x, weight, bias)
        return self.dense_linear(x, weight, bias)

    def dense_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x @ weight.T (+ bias) for a weight tensor: layers.linear, unless a kernel set has a faster matmul."""
        return linear(x, weight, bias)

    def norm_linear(self, hidden: torch.Tensor, delta: Optional[torch.Tensor], norm_weight: torch.Tensor,
                    weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, norm(hidden + delta) @ weight.T (+ bias)): the norm before a layer's input
        projection; a kernel set may run both in one kernel."""
        hidden, x = self.add_norm(hidden, delta, norm_weight)
        return hidden, self.linear(x, weight, bias)

    def norm_gate_up(self, hidden: torch.Tensor, delta: Optional[torch.Tensor], norm_weight: torch.Tensor,
                     weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        """(hidden + delta, gate, up): norm_linear into a fused gate/up weight, split in its halves
        (plain CPU weights run one matmul per half: layers.linear_halves; a QuantWeight one matmul)."""
        hidden, x = self.add_norm(hidden, delta, norm_weight)
        if isinstance(weight, QuantWeight):
            return (hidden, *self.linear(x, weight, bias).chunk(2, dim=-1))
        return (hidden, *linear_halves(x, weight, bias, matmul=self.linear))

    def rope_and_cache(self, qkv: torch.Tensor, rope, meta, k_slots: torch.Tensor, v_slots: torch.Tensor,
                       q_norm: Optional[torch.Tensor] = None, k_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim] from qkv [num_tokens, q + k + v], after the per-head q/k
        norms (where the shape has them) and RoPE (q and k rotate together); k and v are written
        at the step's slots."""
        s, num_tokens = self.shape, qkv.shape[0]
        qk_size = (s.num_heads + s.num_kv_heads) * s.head_dim
        qk = qkv[:, :qk_size].view(num_tokens, -1, s.head_dim)  # [num_tokens, num_heads + num_kv_heads, head_dim]
        v = qkv[:, qk_size:].view(num_tokens, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            qk = torch.cat((self.norm(qk[:, : s.num_heads], q_norm), self.norm(qk[:, s.num_heads :], k_norm)), dim=1)
        qk = apply_rope(qk, *rope)
        write_kv(k_slots, v_slots, qk[:, s.num_heads :], v, meta)
        return qk[:, : s.num_heads]

    def attention(self, q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, meta, scale: float,
                  softcap: Optional[float] = None) -> torch.Tensor:
        """Attention [num_tokens, num_heads * head_dim] of q over the cached K/V (model/attention.py)."""
        return paged_attention(q, k_slots, v_slots, meta, scale, softcap)

    def act_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate) · up: the gated MLP's middle."""
        return self.act(gate) * up

    def linear_residual(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        hidden: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """An output projection and the residual stream: (hidden, x @ weight.T) with the add left
        to the next norm, or (hidden + x @ weight.T, None) where a kernel set adds it in the matmul."""
        return hidden, self.linear(x, weight, bias)

    def whole_layer(self, hidden: torch.Tensor, rope, meta, scale: float, reference):
        """A whole layer in one call for this step (kernels/native_layer.py's LayerCall), where the set
        has one and the step is one it runs; `reference(w, hidden, delta, rope, meta, k, v)` is the
        decoder's layer over this set, which the call must match. None: the layer runs op by op."""
        return None

    def describe(self) -> dict:
        """What this kernel set runs, for reports (`llmrun bench`)."""
        return {"set": self.name, **self.quant.describe()}


class FusedKernels(Kernels):
    """A set of fused kernels: add + RMSNorm, RoPE + the K/V writes, SiLU·mul and decode attention
    (each subclass says where each may run), the layer's operations over them, and the self-check
    against ATen every set passes before use. Subclasses say how close a fused norm must be
    (`norms_agree`)."""

    layer = None  # a whole decode layer in one call where the set has one (kernels/native_layer.py)

    def can_silu_mul(self, num_rows: int) -> bool:
        return False

    def can_attend(self, meta, softcap) -> bool:
        return False

    def add_norm(self, hidden, delta, weight):
        return self.add_rms_norm(hidden, delta, weight)

    def norm_gate_up(self, hidden, delta, norm_weight, weight, bias=None):
        """One matmul over the fused gate/up weight (with its norm), split in its halves."""
        hidden, gate_up = self.norm_linear(hidden, delta, norm_weight, weight, bias)
        return (hidden, *gate_up.chunk(2, dim=-1))

    def rope_and_cache(self, qkv, rope, meta, k_slots, v_slots, q_norm=None, k_norm=None):
        return self.rope_qkv(qkv, rope[0], rope[1], k_slots, v_slots, meta.slot_mapping)

    def attention(self, q, k_slots, v_slots, meta, scale, softcap=None):
        if self.can_attend(meta, softcap):
            return self.attend(q, k_slots, v_slots, meta, scale)
        return super().attention(q, k_slots, v_slots, meta, scale, softcap)

    def act_mul(self, gate, up):
        return self.silu_mul(gate, up) if self.can_silu_mul(gate.shape[0]) else super().act_mul(gate, up)

    def norms_agree(self, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        return torch.equal(actual, expected)

    def describe(self) -> dict:
        return {**super().describe(), "silu_mul": self.can_silu_mul(1)}

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
        size, eps = self.shape.hidden_size, self.shape.eps
        hidden, delta = self._randn(generator, rows, size, scale=scale), self._randn(generator, rows, size, scale=scale)
        weight = self._randn(generator, size, scale=0.5)
        summed, normed = self.add_rms_norm(hidden, delta, weight)
        alone = self.add_rms_norm(hidden, None, weight)[1]
        return (torch.equal(summed, hidden + delta) and self.norms_agree(normed, rms_norm(hidden + delta, weight, eps))
                and self.norms_agree(alone, rms_norm(hidden, weight, eps)))

    def _rope_matches(self, generator, rows: int) -> bool:
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

    def attend(self, q, k_slots, v_slots, meta, scale):
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
