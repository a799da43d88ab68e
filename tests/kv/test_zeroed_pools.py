"""The CPU K/V pools come from one anonymous mapping: zero, independent, and resident only once used."""

import psutil
import torch

from llmrun.kv.paged_cache import KVCacheShape, PagedKVCache


def test_cpu_pools_are_zero_independent_contiguous_and_page_aligned():
    cache = PagedKVCache(KVCacheShape(4, 8, 16, 2, 8), torch.bfloat16, "cpu")
    pools = cache.k_pools + cache.v_pools
    assert all(p.shape == (8, 16, 2, 8) and p.dtype == torch.bfloat16 and p.is_contiguous() for p in pools)
    assert all(p.data_ptr() % 4096 == 0 for p in pools)
    assert all(not p.any() for p in pools)
    k, v = cache.layer(2)
    k[5] = 1.5
    v[7] = -2.0
    assert cache.k_pools[2][0, 5].eq(1.5).all() and cache.v_pools[2][0, 7].eq(-2.0).all()
    assert [int(p.count_nonzero()) for p in pools] == [0, 0, 16, 0, 0, 0, 16, 0]


def test_a_large_cpu_cache_is_not_resident_until_used():
    process = psutil.Process()
    before = process.memory_info().rss
    cache = PagedKVCache(KVCacheShape(24, 4096, 16, 8, 64), torch.float32, "cpu")  # 6 GiB of K/V
    assert cache.total_bytes == 6 * 2**30
    assert process.memory_info().rss - before < 64 * 2**20
    k, _ = cache.layer(0)
    k[:16384] = 1.0  # 32 MiB of one layer's K
    grown = process.memory_info().rss - before
    assert 32 * 2**20 <= grown < 96 * 2**20
