"""make_plan: measure (or take overrides), size the model from headers, plan, estimate, warn.

`llmrun plan`, `run` and `chat` all plan through this one function.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from llmrun.plan.calibration import machine_figures, record_figures
from llmrun.plan.devices import MeasuredMemory, measure_memory
from llmrun.plan.estimate import PageCacheOutlook, SpeedEstimate, estimate_speed, format_tok_s, learnt_figures
from llmrun.plan.model_sizes import ModelSizes, model_sizes, tensor_layer
from llmrun.plan.placement import plan, smallest_budget
from llmrun.plan.tiers import Budgets, Placement, PlanError, PlanOptions, Tier
from llmrun.plan.policy import DTYPE_BYTES, DTYPE_TAGS, context_length, dtype_name
from llmrun.plan.residency import resident_fraction
from llmrun.sizes import format_bytes
from llmrun.weights.index import CheckpointIndex


@dataclass(frozen=True)
class PlanRequest:
    gpu_mem_bytes: Optional[int] = None   # None: measure; 0: no GPU
    cpu_mem_bytes: Optional[int] = None   # None: measure
    ctx: Optional[int] = None             # None: the model's context, capped
    batch: int = 1
    dtype: str = "auto"
    block_size: int = 16
    quant: str = "none"                   # int8 | int4: plan (and load) a float model quantized on load


@dataclass(frozen=True)
class PlanReport:
    placement: Placement
    estimate: SpeedEstimate
    measured: MeasuredMemory
    request: PlanRequest
    dtype: str                            # the concrete run dtype
    warnings: tuple[str, ...]
    floor_bytes: int                      # the smallest fast-tier budget this context and batch run in

    @property
    def floor_tier(self) -> Tier:
        return self.placement.compute_tier


def make_plan(config: dict, index: CheckpointIndex, request: PlanRequest,
              folder: Optional[Path] = None) -> PlanReport:
    """Plan a model (config.json dict + safetensors header index) for this machine."""
    if request.batch < 1:
        raise PlanError(f"--batch must be at least 1, got {request.batch}")
    measured = measure_memory(folder, want_gpu=request.gpu_mem_bytes != 0)
    gpu_bytes = request.gpu_mem_bytes if request.gpu_mem_bytes is not None else measured.gpu_free_bytes
    budgets = Budgets(gpu_bytes or None,
                      request.cpu_mem_bytes if request.cpu_mem_bytes is not None else measured.cpu_available_bytes,
                      measured.disk_free_bytes)
    dtype = dtype_name(request.dtype, "cuda" if budgets.has_gpu else "cpu")
    sizes = model_sizes(quant_index(index, request.quant), config, DTYPE_BYTES[dtype])
    ctx = context_length(request.ctx, sizes.max_context)
    options = PlanOptions(ctx=ctx, dtype_bytes=DTYPE_BYTES[dtype], batch=request.batch,
                          block_size=request.block_size)
    placement = plan(sizes, budgets, options)
    estimate = estimate_speed(placement, machine_figures(budgets.has_gpu), dtype,
                              _page_cache_outlook(index, placement, dtype, measured))
    warnings = _warnings(placement, estimate, sizes, budgets, options, measured.gpu_free_bytes)
    return PlanReport(placement, estimate, measured, request, dtype, warnings,
                      smallest_budget(sizes, budgets, options))


LEARN_MIN_TOKENS = 16   # fewer decode steps than this time too little to learn from


def record_run(report: PlanReport, decode_tok_s: float, num_tokens: int) -> None:
    """Refresh the calibration from what one sequence run on this plan achieved: `decode_tok_s`
    over `num_tokens` generated tokens (the first, the prefill's, not counted in the rate)."""
    if decode_tok_s > 0 and num_tokens >= LEARN_MIN_TOKENS:
        record_figures(learnt_figures(report.placement, report.estimate, report.dtype, 1.0 / decode_tok_s))


def _page_cache_outlook(index: CheckpointIndex, placement: Placement, dtype: str,
                        measured: MeasuredMemory) -> PageCacheOutlook:
    """How much of the disk tier the page cache holds now (mincore over its byte ranges) and may
    hold: the available memory less what the plan itself takes. Layers read from the offload cache
    (converted to the run dtype) are not the checkpoint's bytes: their residency is not asked."""
    room = max(measured.cpu_available_bytes - placement.total_bytes(Tier.CPU), 0)
    if not placement.streamed_bytes_per_token(Tier.DISK):
        return PageCacheOutlook(None, room)
    disk_layers = {i for i, tier in enumerate(placement.layer_tiers) if tier is Tier.DISK}
    ranges, converted = [], False
    for name, info in index.tensors.items():
        layer = tensor_layer(name, placement.sizes.num_layers)
        if (layer in disk_layers) or (layer is None and placement.head_tier is Tier.DISK):
            ranges.append((info.file, info.start, info.end))
            converted |= info.dtype in DTYPE_TAGS.values() and info.dtype != DTYPE_TAGS[dtype]
    return PageCacheOutlook(None if converted else resident_fraction(ranges), room)


def quant_index(index: CheckpointIndex, quant: str) -> CheckpointIndex:
    """The index as loaded: with `--quant`, a float model's matmul weights at their compressed sizes."""
    from llmrun.errors import UsageError
    from llmrun.quant.spec import QuantSpec, is_quantized, planned_index

    if quant == "none":
        return index
    spec = QuantSpec.parse(quant)
    if is_quantized(index):
        raise UsageError(f"{index.folder} is already quantized; run it without --quant")
    return planned_index(index, spec)


def _warnings(placement: Placement, estimate: SpeedEstimate, sizes: ModelSizes, budgets: Budgets,
              options: PlanOptions, measured_gpu: Optional[int]) -> tuple[str, ...]:
    warnings = []
    if budgets.has_gpu and measured_gpu is None:
        warnings.append("no CUDA GPU is available here: this GPU plan is hypothetical (runs need --gpu-mem 0)")
    if placement.streams:
        shorter = _context_without_offload(sizes, budgets, options)
        if shorter:
            fast = "GPU" if budgets.has_gpu else "CPU memory"
            warnings.append(f"weights are offloaded, but with --ctx {shorter} every layer would fit in {fast}")
    disk_bytes = placement.streamed_bytes_per_token(Tier.DISK)
    if disk_bytes:
        num_disk = sum(1 for tier in placement.layer_tiers if tier is Tier.DISK)
        warnings.append(
            f"{num_disk} layers stream from disk ({format_bytes(disk_bytes)} per token): this will be slow, "
            f"about {format_tok_s(estimate.decode_tok_s_low, estimate.decode_tok_s_high)} tok/s"
        )
    return tuple(warnings)


def _context_without_offload(sizes: ModelSizes, budgets: Budgets, options: PlanOptions) -> Optional[int]:
    """The longest context (>= 256 tokens, a multiple of 256) at which nothing streams, if any."""
    lo, hi = 0, options.ctx // 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            fits = not plan(sizes, budgets, replace(options, ctx=mid * 256)).streams
        except PlanError:
            fits = False
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return lo * 256 if lo else None
