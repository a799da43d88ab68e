"""Expected speed of a Placement: the bytes each decode step reads and moves, and the machine's figures.

A decode step reads every weight once (resident, or staged after streaming) plus the KV cache, and
pays a fixed cost per layer (small ops, launches); layers that stream also move their bytes from the
page cache or the disk (the compute device's own pread on a CPU, the pinned link on a GPU). On a CPU,
16-bit weights that stream are computed as staged, without the prepacking resident ones get, at
their own rate (`unpacked_read`). The same
model holds for float and quantized weights: the bytes come from the checkpoint index. What runs
achieve refines the figures (`learnt_figures`), so the next plan on this machine says what it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llmrun.plan.calibration import RUNS, Figure, step_figure_name
from llmrun.plan.tiers import Placement, Tier

ASSUMED_GPU_FLOPS = 100e12   # sustained fp16/bf16 dense matmul
ASSUMED_CPU_FLOPS = 0.3e12   # a few cores with AVX-512/AMX
SHORT_CONTEXT = 256          # the decode estimate's context; the full context is given beside it
UNPACKED_DTYPES = ("bfloat16", "float16")  # prepacked when resident on a CPU (weights/packing.py), not when staged
UNPACKED_FIGURE = "cpu_unpacked_read_bytes_s"


@dataclass(frozen=True)
class PageCacheOutlook:
    """What the page cache holds of the disk tier's bytes now, and how much it may hold."""

    resident_fraction: Optional[float]   # of the disk tier's bytes, by mincore; None: could not be asked
    room_bytes: int                      # memory left to the page cache beside the plan


@dataclass(frozen=True)
class SpeedEstimate:
    bytes_per_token: dict                # tier name -> weight bytes held there and read per decode step
    read_bytes_per_token: int            # weights and short-context KV one decode step reads
    decode_tok_s_low: float              # per sequence, short context; transfers not overlapped with compute
    decode_tok_s_high: float             # per sequence, short context; transfers fully overlapped
    decode_tok_s_full_ctx: float         # the low end with attention over the whole context
    prefill_tok_s: float
    disk_warm: bool                      # disk-tier reads come from the page cache after the first pass
    first_read_s: float                  # reading the disk tier once (the first pass, cold where not cached)
    resident_fraction: Optional[float]   # of the disk tier's bytes in the page cache at plan time
    figures: dict                        # role -> Figure (compute_read, layer_step, page_cache_read, ...)


def _roles(placement: Placement, figures: dict[str, Figure], dtype: str) -> dict[str, Figure]:
    """The figures this placement's estimate reads, by role."""
    device = "gpu" if placement.compute_tier is Tier.GPU else "cpu"
    step = figures.get(f"{step_figure_name(device)}/{dtype}") or figures[step_figure_name(device)]
    roles = {"compute_read": figures[f"{device}_read_bytes_s"], "layer_step": step}
    if placement.streamed_bytes_per_token(Tier.DISK):
        if device == "cpu" and dtype in UNPACKED_DTYPES:
            roles["unpacked_read"] = (figures.get(f"{UNPACKED_FIGURE}/{dtype}") or figures[UNPACKED_FIGURE])
        roles["page_cache_read"] = figures["page_cache_read_bytes_s"]
        roles["disk_read"] = figures["disk_read_bytes_s"]
    if device == "gpu":
        roles["host_to_gpu"] = figures["host_to_gpu_bytes_s"]
    return roles


def _compute_bytes(placement: Placement, kv_tokens: int, rows: int) -> int:
    """Weights read by one decode step of `rows` sequences (the embeddings are a row lookup) and the
    KV cache they attend over."""
    sizes = placement.sizes
    weights = sum(sizes.layer_bytes) + sizes.head_bytes + sizes.other_bytes
    return weights + sizes.kv_bytes_per_token * kv_tokens * rows


def _step_times(placement: Placement, roles: dict[str, Figure], kv_tokens: int, disk_warm: bool) -> list[float]:
    """Seconds of one decode step: compute, then each transfer that may overlap it."""
    from_disk = placement.streamed_bytes_per_token(Tier.DISK)
    unpacked = from_disk if "unpacked_read" in roles else 0
    compute = ((_compute_bytes(placement, kv_tokens, placement.batch) - unpacked) / roles["compute_read"].value
               + placement.sizes.num_layers * roles["layer_step"].value)
    if unpacked:
        compute += unpacked / roles["unpacked_read"].value
    times = [compute]
    if from_disk:
        times.append(from_disk / roles["page_cache_read" if disk_warm else "disk_read"].value)
    if "host_to_gpu" in roles:
        times.append((placement.streamed_bytes_per_token(Tier.CPU) + from_disk) / roles["host_to_gpu"].value)
    return times


def estimate_speed(placement: Placement, figures: dict[str, Figure], dtype: str,
                   page_cache: PageCacheOutlook) -> SpeedEstimate:
    """Decode: compute and transfers summed (low) or overlapped (high), at a short and the full context."""
    gpu = placement.compute_tier is Tier.GPU
    roles = _roles(placement, figures, dtype)
    from_cpu = placement.streamed_bytes_per_token(Tier.CPU)
    from_disk = placement.streamed_bytes_per_token(Tier.DISK)
    disk_warm = from_disk <= page_cache.room_bytes
    short = _step_times(placement, roles, min(SHORT_CONTEXT, placement.ctx), disk_warm)
    full = _step_times(placement, roles, placement.ctx, disk_warm)
    first_read_s = 0.0
    if from_disk:
        held = page_cache.resident_fraction or 0.0
        first_read_s = from_disk * (held / roles["page_cache_read"].value + (1 - held) / roles["disk_read"].value)
    chunk = placement.prefill_chunk * placement.batch
    flops = 2 * placement.sizes.num_parameters * chunk
    pass_s = max(flops / (ASSUMED_GPU_FLOPS if gpu else ASSUMED_CPU_FLOPS), sum(short))
    per_token = {placement.compute_tier.value: placement.weight_bytes(placement.compute_tier), "disk": from_disk}
    if gpu:
        per_token["cpu"] = from_cpu
    return SpeedEstimate(
        bytes_per_token=per_token,
        read_bytes_per_token=_compute_bytes(placement, min(SHORT_CONTEXT, placement.ctx), 1),
        decode_tok_s_low=1.0 / sum(short),
        decode_tok_s_high=1.0 / max(short),
        decode_tok_s_full_ctx=1.0 / sum(full),
        prefill_tok_s=chunk / pass_s,
        disk_warm=disk_warm,
        first_read_s=first_read_s,
        resident_fraction=page_cache.resident_fraction if from_disk else None,
        figures=roles,
    )


def learnt_figures(placement: Placement, estimate: SpeedEstimate, dtype: str, step_s: float) -> dict[str, Figure]:
    """The figures one sequence decoding at `step_s` seconds a token shows, keyed as the
    calibration file keys them. The time beyond the estimate's other terms is put on the one term a
    placement exercises: the per-layer step cost (resident; the memory read when even that is
    faster than the read figure), the rate 16-bit streamed layers compute at (CPU streaming from
    disk in bf16/fp16: the reads have their own probe), the page cache or disk rate (CPU streaming
    float32 from disk), the pinned link (GPU streaming from CPU memory). Nothing is learnt from a
    run that cannot tell."""
    if step_s <= 0:
        return {}
    device = "gpu" if placement.compute_tier is Tier.GPU else "cpu"
    roles = estimate.figures
    compute_bytes = estimate.read_bytes_per_token
    read_s = compute_bytes / roles["compute_read"].value
    num_layers = placement.sizes.num_layers
    from_cpu = placement.streamed_bytes_per_token(Tier.CPU)
    from_disk = placement.streamed_bytes_per_token(Tier.DISK)
    step_name = f"{step_figure_name(device)}/{dtype}"
    if not placement.streams:
        if step_s > read_s:
            return {step_name: Figure((step_s - read_s) / num_layers, RUNS)}
        return {f"{device}_read_bytes_s": Figure(compute_bytes / step_s, RUNS), step_name: Figure(0.0, RUNS)}
    compute_s = read_s + num_layers * roles["layer_step"].value
    if device == "cpu" and from_disk and "unpacked_read" in roles:
        # 16-bit streamed layers: the time beyond the resident reads, the step costs and the measured
        # read rate is their computing as staged
        reader = roles["page_cache_read" if estimate.disk_warm else "disk_read"].value
        rest = step_s - (compute_bytes - from_disk) / roles["compute_read"].value - num_layers * roles[
            "layer_step"].value - from_disk / reader
        return {f"{UNPACKED_FIGURE}/{dtype}": Figure(from_disk / rest, RUNS)} if rest > 0 else {}
    if device == "cpu" and from_disk and step_s > compute_s:
        name = "page_cache_read_bytes_s" if estimate.disk_warm else "disk_read_bytes_s"
        return {name: Figure(from_disk / (step_s - compute_s), RUNS)}
    if device == "gpu" and from_cpu and not from_disk and step_s > compute_s:
        return {"host_to_gpu_bytes_s": Figure(from_cpu / step_s, RUNS)}
    return {}


def format_tok_s(low: float, high: float) -> str:
    """A speed range for people: whole numbers from 100 tok/s, three figures below (never an
    exponent); one figure when both ends print alike. 6320.4, 6320.4 -> "6320"; 11.2, 12.0 -> "11.2-12"."""

    def figure(value: float) -> str:
        return f"{value:.0f}" if value >= 100 else f"{value:.3g}" if value >= 0.01 else f"{value:.1g}"

    low_text, high_text = figure(low), figure(high)
    return low_text if low_text == high_text else f"{low_text}-{high_text}"
