"""Shared decoder layers as functions: RMSNorm, RoPE, paged attention, gated MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmrun.errors import UnsupportedArchitectureError
from llmrun.kv.metadata import AttentionMetadata


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias); `weight` may be a oneDNN-packed CPU weight (see weights/packing.py)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled by `weight` in the input dtype (as transformers does;
    torch.rms_norm on float32 input gives the same bits as its pow/mean/rsqrt sequence)."""
    return weight * torch.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps).to(x.dtype)


def rope_inv_freq(rope_parameters: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the attention scaling for a RoPE config."""
    theta = float(rope_parameters.get("rope_theta", 10000.0))
    rope_type = rope_parameters.get("rope_type") or rope_parameters.get("type") or "default"
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(rope_parameters["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_parameters), 1.0
    raise UnsupportedArchitectureError(f"RoPE scaling type {rope_type!r} is not supported yet")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable:
    """cos/sin for positions [0, max_positions), computed once in float32, kept in the run dtype.

    `sin` is stored sign-folded (first half negated) so that rotate_half(x) * sin becomes
    x.roll(half) * sin_folded: the same products, bit for bit, in fewer operations.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int, dtype, device):
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, rotary_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, rotary_dim]
        cos = (emb.cos() * attention_scaling).to(dtype=dtype)
        sin = (emb.sin() * attention_scaling).to(dtype=dtype)
        half = sin.shape[-1] // 2
        self.cos = cos.to(device)
        self.sin_folded = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(device)
        self.max_positions = max_positions

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, folded sin for each token: [num_tokens, 1, rotary_dim], broadcastable over heads."""
        return self.cos[positions].unsqueeze(1), self.sin_folded[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """Rotate x [num_tokens, num_heads, head_dim] (only the first cos.shape[-1] dims): the result of
    (x * cos) + (rotate_half(x) * sin), computed as (x * cos) + (x.roll(half) * sin_folded)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return (x * cos) + (x.roll(rotary_dim // 2, dims=-1) * sin_folded)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat(((rot * cos) + (rot.roll(rotary_dim // 2, dims=-1) * sin_folded), rest), dim=-1)


def write_kv(k_slots: torch.Tensor, v_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Store this step's k, v [num_tokens, num_kv_heads, head_dim] at their slots."""
    k_slots.index_copy_(0, meta.slot_mapping, k)
    v_slots.index_copy_(0, meta.slot_mapping, v)


def paged_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of q [num_tokens, num_heads, head_dim] over each sequence's cached K/V.

    K/V are read only through the metadata's slot indices. Returns [num_tokens, num_heads * head_dim].
    """
    num_tokens, num_heads, head_dim = q.shape
    gqa = num_heads != k_slots.shape[1]
    if meta.decode_span is not None:  # one sequence, its slots contiguous: read the pool in place
        start, length = meta.decode_span
        keys = k_slots.narrow(0, start, length).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx, dim]
        values = v_slots.narrow(0, start, length).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, scale=scale, enable_gqa=gqa)
        return out.reshape(num_tokens, num_heads * head_dim)
    if meta.is_decode:
        keys = k_slots[meta.decode_slots].transpose(1, 2)  # [num_seqs, num_kv_heads, ctx, head_dim]
        values = v_slots[meta.decode_slots].transpose(1, 2)
        query = q.unsqueeze(2)  # [num_seqs, num_heads, 1, head_dim]
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa
        )
        return out.reshape(num_tokens, num_heads * head_dim)
    outputs = []
    for start, num_new, num_cached, slots in zip(
        meta.query_starts, meta.query_lens, meta.cached_lens, meta.context_slots
    ):
        query = q[start : start + num_new].transpose(0, 1).unsqueeze(0)  # [1, num_heads, new, head_dim]
        keys = k_slots[slots].transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, ctx, head_dim]
        values = v_slots[slots].transpose(0, 1).unsqueeze(0)
        mask, causal = None, num_new > 1
        if num_cached and num_new > 1:
            ctx = num_cached + num_new
            rows = torch.arange(num_new, device=q.device)[:, None] + num_cached
            mask, causal = torch.arange(ctx, device=q.device)[None, :] <= rows, False
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        outputs.append(out[0].transpose(0, 1).reshape(num_new, num_heads * head_dim))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def activation(name: str):
    """The MLP activation function for a config's `hidden_act`."""
    if name == "silu":
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise UnsupportedArchitectureError(f"activation {name!r} is not supported yet")
