"""What a plan is: the memory tiers, the budgets and options the planner is given, and the Placement it
returns (plan/placement.py computes it)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from llmrun.errors import LlmrunError
from llmrun.plan.model_sizes import ModelSizes

MiB = 1024**2
DEFAULT_GPU_RUNTIME_BYTES = 768 * MiB   # CUDA context (~700 MB measured on an H200), cuBLAS, slack
PREFILL_CHUNKS = (512, 256, 128, 64)    # prompt tokens a step runs at most: the choices, halving


class PlanError(LlmrunError):
    """The model (or the requested context) cannot run within the budgets."""


class Tier(str, Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


@dataclass(frozen=True)
class Budgets:
    """Memory the plan may use. gpu_bytes None or 0 plans for CPU and disk only."""

    gpu_bytes: Optional[int]
    cpu_bytes: int
    disk_bytes: Optional[int] = None

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu_bytes)


@dataclass(frozen=True)
class PlanOptions:
    ctx: int
    dtype_bytes: int
    batch: int = 1
    block_size: int = 16
    prefill_chunks: tuple[int, ...] = PREFILL_CHUNKS  # the prefill chunks the plan chooses from, largest first
    gpu_runtime_bytes: int = DEFAULT_GPU_RUNTIME_BYTES


@dataclass(frozen=True)
class Reservation:
    name: str          # runtime | kv_cache | workspace | staging | pinned_staging
    tier: Tier
    num_bytes: int
    detail: str


@dataclass(frozen=True)
class Placement:
    """Where every weight lives, what is reserved, and how many KV blocks exist."""

    layer_tiers: tuple[Tier, ...]
    head_tier: Tier                    # lm_head, or the tied embeddings
    embed_tier: Tier                   # the input embedding table (== head_tier when tied)
    compute_tier: Tier                 # GPU when a GPU is used, else CPU
    ctx: int
    batch: int
    block_size: int
    num_kv_blocks: int
    reservations: tuple[Reservation, ...]
    budgets: Budgets
    sizes: ModelSizes
    staging_piece_bytes: int = 0       # the most one staged piece holds (weights/pieces.py); 0: nothing streams
    prefill_chunk: int = PREFILL_CHUNKS[0]  # prompt tokens a step runs at most (the workspace's size)

    def weight_bytes(self, tier: Tier) -> int:
        sizes = self.sizes
        total = sum(b for b, t in zip(sizes.layer_bytes, self.layer_tiers) if t is tier)
        if self.head_tier is tier:
            total += sizes.head_bytes + sizes.other_bytes
        if not sizes.tied_embeddings and self.embed_tier is tier:
            total += sizes.embed_bytes
        return total

    def reserved_bytes(self, tier: Tier) -> int:
        return sum(r.num_bytes for r in self.reservations if r.tier is tier)

    def total_bytes(self, tier: Tier) -> int:
        return self.weight_bytes(tier) + self.reserved_bytes(tier)

    def streamed_bytes_per_token(self, tier: Tier) -> int:
        """Weight bytes moved from `tier` to the compute device for every decode step."""
        if tier is self.compute_tier:
            return 0
        total = sum(b for b, t in zip(self.sizes.layer_bytes, self.layer_tiers) if t is tier)
        if self.head_tier is tier:
            total += self.sizes.head_bytes + self.sizes.other_bytes
        return total

    def streamed_bytes(self) -> int:
        """Weight bytes moved to the compute device every decode step, from every slower tier."""
        return sum(self.streamed_bytes_per_token(t) for t in Tier if t is not self.compute_tier)

    def layer_ranges(self, tier: Tier) -> list[tuple[int, int]]:
        """Contiguous [start, end) ranges of decoder layers in `tier`."""
        ranges: list[tuple[int, int]] = []
        for idx, layer_tier in enumerate(self.layer_tiers):
            if layer_tier is tier:
                if ranges and ranges[-1][1] == idx:
                    ranges[-1] = (ranges[-1][0], idx + 1)
                else:
                    ranges.append((idx, idx + 1))
        return ranges

    @property
    def kv_tier(self) -> Tier:
        return self.compute_tier

    @property
    def kv_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def streams(self) -> bool:
        return any(t is not self.compute_tier for t in self.layer_tiers) or self.head_tier is not self.compute_tier
