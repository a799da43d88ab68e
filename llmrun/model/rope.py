"""Rotary position embeddings: inverse frequencies per RoPE type, the cos/sin tables, and the rotation."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

from llmrun.errors import UnsupportedArchitectureError
from llmrun.kv.metadata import AttentionMetadata

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_type_of(rope_parameters: Mapping) -> str:
    return rope_parameters.get("rope_type") or rope_parameters.get("type") or "default"


def _base_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    """theta ** (2i / rotary_dim) for i < rotary_dim // 2, in float32 (transformers' exponents)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return theta**exponents


def rope_inv_freq(rope_parameters: Mapping, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim // 2] (float32) and the attention scaling of a one-table RoPE."""
    theta = float(rope_parameters.get("rope_theta", 10000.0))
    rope_type = rope_type_of(rope_parameters)
    inv_freq = 1.0 / _base_inv_freq(theta, rotary_dim)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(rope_parameters["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_parameters), 1.0
    raise UnsupportedArchitectureError(
        f"RoPE scaling type {rope_type!r} is not supported yet; supported: {', '.join(ROPE_TYPES)}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, params: Mapping) -> torch.Tensor:
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


def longrope_inv_freqs(params: Mapping, rotary_dim: int,
                       max_position_embeddings: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): short and long inverse frequencies and the
    attention scaling that multiplies cos/sin, which both share.

    Without an explicit `factor`, the factor is max_position_embeddings / original (as transformers
    does), and the scaling sqrt(1 + ln(factor) / ln(original)) unless `attention_factor` is given.
    """
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    scaling = params.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    base = _base_inv_freq(float(params.get("rope_theta", 10000.0)), rotary_dim)
    short = 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * base)
    long = 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * base)
    return short, long, float(scaling)


class RotaryTable:
    """cos/sin for positions [0, max_positions), computed once in float32, kept in the run dtype.

    `sin` is stored sign-folded (first half negated) so that rotate_half(x) * sin becomes
    x.roll(half) * sin_folded: the same products, bit for bit, in fewer operations.

    A table may hold two variants (LongRoPE's short and long factors): a sequence uses the long one
    once it has more than `long_after` tokens, which is how transformers picks them (by the length
    of the sequence the forward sees).
    """

    def __init__(self, inv_freqs: Sequence[torch.Tensor], attention_scaling: float, max_positions: int,
                 dtype, device, long_after: Optional[int] = None):
        assert (long_after is None) == (len(inv_freqs) == 1), "two variants need a switch length"
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.cat([positions[:, None] * f[None, :] for f in inv_freqs])  # [variants * max_pos, dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [variants * max_positions, rotary_dim]
        cos = (emb.cos() * attention_scaling).to(dtype=dtype)
        sin = (emb.sin() * attention_scaling).to(dtype=dtype)
        half = sin.shape[-1] // 2
        self.cos = cos.to(device)
        self.sin_folded = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(device)
        self.max_positions = max_positions
        self.long_after = long_after

    def variant(self, seq_len: int) -> int:
        """0, or 1 when a LongRoPE sequence of `seq_len` tokens uses the long factors."""
        return int(self.long_after is not None and seq_len > self.long_after)

    def lookup(self, positions: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, folded sin for each token: [num_tokens, 1, rotary_dim], broadcastable over heads."""
        if self.long_after is not None:
            offsets = [self.variant(n) * self.max_positions for n in meta.seq_lens]
            if len(set(offsets)) == 1:
                positions = positions + offsets[0]
            else:  # sequences of this step use different variants: one offset per token
                per_token = torch.repeat_interleave(torch.tensor(offsets), torch.tensor(meta.query_lens))
                positions = positions + per_token.to(positions.device)
        return self.cos[positions].unsqueeze(1), self.sin_folded[positions].unsqueeze(1)


def rotary_table(rope_parameters: Mapping, rotary_dim: int, max_position_embeddings: int,
                 max_positions: int, dtype, device) -> RotaryTable:
    """The RotaryTable for a config's RoPE parameters (LongRoPE gets its two variants)."""
    if rope_type_of(rope_parameters) == "longrope":
        short, long, scaling = longrope_inv_freqs(rope_parameters, rotary_dim, max_position_embeddings)
        return RotaryTable((short, long), scaling, max_positions, dtype, device,
                           long_after=int(rope_parameters["original_max_position_embeddings"]))
    inv_freq, scaling = rope_inv_freq(rope_parameters, rotary_dim)
    return RotaryTable((inv_freq,), scaling, max_positions, dtype, device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """Rotate x [num_tokens, num_heads, head_dim] (only the first cos.shape[-1] dims): the result of
    (x * cos) + (rotate_half(x) * sin), computed as (x * cos) + (x.roll(half) * sin_folded)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return (x * cos) + (x.roll(rotary_dim // 2, dims=-1) * sin_folded)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat(((rot * cos) + (rot.roll(rotary_dim // 2, dims=-1) * sin_folded), rest), dim=-1)
