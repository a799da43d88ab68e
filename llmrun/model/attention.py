"""Paged attention: K/V written at slot indices and read back through AttentionMetadata."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llmrun.kv.metadata import AttentionMetadata
from llmrun.model.layers import soft_cap


def write_kv(k_slots: torch.Tensor, v_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Store this step's k, v [num_tokens, num_kv_heads, head_dim] at their slots."""
    k_slots.index_copy_(0, meta.slot_mapping, k)
    v_slots.index_copy_(0, meta.slot_mapping, v)


def attend(query, keys, values, mask, causal: bool, scale: float, softcap: Optional[float]):
    """softmax(q·kᵀ·scale [soft-capped], masked) · v for q [b, heads, n, d], k/v [b, kv_heads, ctx, d].

    Without soft-capping this is SDPA. With it (Gemma 2) scores become tanh(s / cap) · cap before
    the mask, as transformers' eager attention computes them; query heads are grouped over their
    K/V head by broadcasting, so K/V are never copied per query head.
    """
    batch, num_heads, num_new, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=num_heads != num_kv_heads)
    grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, num_new, head_dim)
    scores = torch.matmul(grouped, keys.unsqueeze(2).transpose(3, 4)) * scale  # [b, kv, group, n, ctx]
    scores = soft_cap(scores, softcap)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, values.unsqueeze(2))  # [b, kv_heads, group, n, head_dim]
    return out.reshape(batch, num_heads, num_new, head_dim)


def paged_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                    meta: AttentionMetadata, scale: float, softcap: Optional[float] = None) -> torch.Tensor:
    """Attention of q [num_tokens, num_heads, head_dim] over each sequence's cached K/V.

    K/V are read only through the metadata's slot indices (a sliding-window layer gets metadata
    already restricted to its window). Returns [num_tokens, num_heads * head_dim].
    """
    num_tokens, num_heads, head_dim = q.shape
    if meta.decode_span is not None:  # one sequence, its slots contiguous: read the pool in place
        start, length = meta.decode_span
        keys = k_slots.narrow(0, start, length).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx, dim]
        values = v_slots.narrow(0, start, length).transpose(0, 1).unsqueeze(0)
        out = attend(q.unsqueeze(2), keys, values, None, False, scale, softcap)
        return out.reshape(num_tokens, num_heads * head_dim)
    if meta.decode_slots is not None and meta.decode_lens is None:  # several decoding sequences
        return torch.cat([decode_alone(q[row : row + 1], k_slots, v_slots, slots, scale, softcap)
                          for row, slots in enumerate(meta.context_slots)])
    if meta.is_decode:  # static decode (engine/graphs.py): a bucket of keys, masked
        keys = k_slots[meta.decode_slots].transpose(1, 2)  # [num_seqs, num_kv_heads, ctx, head_dim]
        values = v_slots[meta.decode_slots].transpose(1, 2)
        query = q.unsqueeze(2)  # [num_seqs, num_heads, 1, head_dim]
        out = attend(query, keys, values, meta.decode_mask, False, scale, softcap)
        return out.reshape(num_tokens, num_heads * head_dim)
    masks = meta.context_masks or (None,) * meta.num_seqs
    outputs = []
    for start, num_new, num_cached, slots, mask in zip(
        meta.query_starts, meta.query_lens, meta.cached_lens, meta.context_slots, masks
    ):
        query = q[start : start + num_new].transpose(0, 1).unsqueeze(0)  # [1, num_heads, new, head_dim]
        keys = k_slots[slots].transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, ctx, head_dim]
        values = v_slots[slots].transpose(0, 1).unsqueeze(0)
        causal = mask is None and num_new > 1
        if causal and num_cached:  # new tokens after cached ones: causal, offset by the cache
            ctx = num_cached + num_new
            rows = torch.arange(num_new, device=q.device)[:, None] + num_cached
            mask, causal = torch.arange(ctx, device=q.device)[None, :] <= rows, False
        out = attend(query, keys, values, mask, causal, scale, softcap)
        outputs.append(out[0].transpose(0, 1).reshape(num_new, num_heads * head_dim))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def decode_alone(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, slots: torch.Tensor,
                 scale: float, softcap: Optional[float]) -> torch.Tensor:
    """One decoding sequence's attention [1, num_heads * head_dim] over its own keys, unpadded and
    unmasked as it runs alone: SDPA over keys padded to a longer row and masked sums in another
    order (on the CPU), so a row would get other bits beside a longer sequence."""
    keys = k_slots[slots].transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, ctx, head_dim]
    values = v_slots[slots].transpose(0, 1).unsqueeze(0)
    out = attend(q.unsqueeze(2), keys, values, None, False, scale, softcap)  # q [1, num_heads, head_dim]
    return out.reshape(1, -1)
