"""Expected speed of a Placement: bytes moved per decoded token and the time they take."""

from __future__ import annotations

from dataclasses import dataclass

from llmrun.plan.devices import Bandwidth
from llmrun.plan.placement import Placement, Tier

ASSUMED_GPU_FLOPS = 100e12   # sustained fp16/bf16 dense matmul
ASSUMED_CPU_FLOPS = 0.3e12   # a few cores with AVX-512/AMX


@dataclass(frozen=True)
class SpeedEstimate:
    bytes_per_token: dict                # tier name -> weight bytes read per decode step
    decode_tok_s_low: float              # per sequence, transfers not overlapped with compute
    decode_tok_s_high: float             # per sequence, transfers fully overlapped
    prefill_tok_s: float
    bandwidths: dict                     # name -> Bandwidth (measured or assumed)


def estimate_speed(placement: Placement, compute: Bandwidth, host_to_gpu: Bandwidth,
                   disk: Bandwidth) -> SpeedEstimate:
    """Decode: resident reads, host->GPU copies and disk reads per step, summed (low) or overlapped (high)."""
    gpu = placement.compute_tier is Tier.GPU
    resident = placement.weight_bytes(placement.compute_tier)
    kv_read = placement.sizes.kv_bytes_per_token * placement.ctx // 2 * placement.batch
    from_cpu = placement.streamed_bytes_per_token(Tier.CPU)
    from_disk = placement.streamed_bytes_per_token(Tier.DISK)
    times = [(resident + kv_read) / compute.bytes_per_s, from_disk / disk.bytes_per_s]
    if gpu:
        times.append((from_cpu + from_disk) / host_to_gpu.bytes_per_s)
    step_low, step_high = sum(times), max(times)
    chunk = min(512, placement.ctx) * placement.batch
    flops = 2 * placement.sizes.num_parameters * chunk
    pass_s = max(flops / (ASSUMED_GPU_FLOPS if gpu else ASSUMED_CPU_FLOPS), step_low)
    bandwidths = {"compute_read": compute, "disk_read": disk}
    per_token = {placement.compute_tier.value: resident, "disk": from_disk}
    if gpu:
        bandwidths["host_to_gpu"] = host_to_gpu
        per_token["cpu"] = from_cpu
    return SpeedEstimate(
        bytes_per_token=per_token,
        decode_tok_s_low=1.0 / step_low,
        decode_tok_s_high=1.0 / step_high,
        prefill_tok_s=chunk / pass_s,
        bandwidths=bandwidths,
    )


def format_tok_s(low: float, high: float) -> str:
    """A speed range for people: whole numbers from 100 tok/s, three figures below (never an
    exponent); one figure when both ends print alike. 6320.4, 6320.4 -> "6320"; 11.2, 12.0 -> "11.2-12"."""

    def figure(value: float) -> str:
        return f"{value:.0f}" if value >= 100 else f"{value:.3g}" if value >= 0.01 else f"{value:.1g}"

    low_text, high_text = figure(low), figure(high)
    return low_text if low_text == high_text else f"{low_text}-{high_text}"
