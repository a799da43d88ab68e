"""The paged KV cache: block allocation, the K/V pools, and block-table -> slot translation."""
