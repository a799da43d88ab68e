"""PagedKVCache: the preallocated per-layer K and V pools, written only at slot indices."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V for one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def total_bytes(self, dtype_bytes: int) -> int:
        return self.bytes_per_token(dtype_bytes) * self.num_blocks * self.block_size


class PagedKVCache:
    """K/V pools of shape [num_blocks, block_size, num_kv_heads, head_dim], one pair per layer."""

    def __init__(self, shape: KVCacheShape, dtype, device):
        import torch

        self.shape = shape
        self.dtype = dtype
        self.device = device
        pool_shape = (shape.num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
        self.k_pools = [torch.zeros(pool_shape, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.v_pools = [torch.zeros(pool_shape, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        slots = (shape.num_blocks * shape.block_size, shape.num_kv_heads, shape.head_dim)
        self._slot_views = [(k.view(slots), v.view(slots)) for k, v in zip(self.k_pools, self.v_pools)]

    def layer(self, layer_idx: int):
        """The (k, v) pools of one layer, flattened to slots: [num_slots, num_kv_heads, head_dim]
        (views made once: every layer of every step asks for them)."""
        return self._slot_views[layer_idx]

    @property
    def total_bytes(self) -> int:
        return self.shape.total_bytes(self.k_pools[0].element_size()) if self.k_pools else 0
