"""Measuring the machine: free GPU memory, available RAM, free disk, copy bandwidths, our RSS.

The only caller of torch.cuda.mem_get_info, psutil and shutil.disk_usage. CUDA is never
initialised when no NVIDIA driver is present.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmrun.paths import calibration_file
from llmrun.storage import atomic_write_bytes

ASSUMED_DISK_READ_BYTES_S = 1.4e9      # uncached NVMe-class reads (ARCHITECTURE.md reference figure)
ASSUMED_CPU_READ_BYTES_S = 20e9         # RAM read bandwidth a small machine reaches in practice
ASSUMED_GPU_READ_BYTES_S = 2.0e12       # HBM-class read bandwidth
ASSUMED_HOST_TO_GPU_BYTES_S = 20e9      # pinned PCIe copies


@dataclass(frozen=True)
class MeasuredMemory:
    gpu_free_bytes: Optional[int]       # None: no usable CUDA device
    gpu_name: Optional[str]
    cpu_available_bytes: int
    disk_free_bytes: Optional[int]


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float
    measured: bool


def has_cuda() -> bool:
    """Whether a CUDA device is usable; cheap and CUDA-free when no NVIDIA driver is loaded."""
    if sys.platform.startswith("linux") and not Path("/proc/driver/nvidia").exists():
        return False
    if sys.platform == "darwin":
        return False
    import torch

    return torch.cuda.is_available()


def measure_memory(model_folder: Optional[Path] = None, *, want_gpu: bool = True) -> MeasuredMemory:
    import psutil

    gpu_free = gpu_name = None
    if want_gpu and has_cuda():
        import torch

        gpu_free, _total = torch.cuda.mem_get_info(0)
        gpu_name = torch.cuda.get_device_name(0)
    disk_free = shutil.disk_usage(model_folder).free if model_folder else None
    return MeasuredMemory(gpu_free, gpu_name, psutil.virtual_memory().available, disk_free)


def _calibration_key() -> str:
    return f"{platform.node()}|{platform.processor() or platform.machine()}"


def _load_calibration() -> dict:
    try:
        return json.loads(calibration_file().read_text()).get(_calibration_key(), {})
    except (OSError, ValueError, AttributeError):
        return {}


def _save_calibration(values: dict) -> None:
    path = calibration_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[_calibration_key()] = {**data.get(_calibration_key(), {}), **values}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(data, indent=2).encode())  # a full disk leaves no temp file
    except OSError:
        pass  # calibration is an optimisation; a read-only home only costs a re-measure


def host_to_gpu_bandwidth(calibrate: bool = True) -> Bandwidth:
    """Pinned host->GPU copy bandwidth: cached calibration, else measured (256 MiB copies)."""
    cached = _load_calibration().get("host_to_gpu_bytes_s")
    if cached:
        return Bandwidth(float(cached), True)
    if not (calibrate and has_cuda()):
        return Bandwidth(ASSUMED_HOST_TO_GPU_BYTES_S, False)
    value = measure_host_to_gpu(256 * 1024**2, repeats=4)
    _save_calibration({"host_to_gpu_bytes_s": value})
    return Bandwidth(value, True)


def measure_host_to_gpu(num_bytes: int, repeats: int) -> float:
    """Pinned host->GPU copy bandwidth in bytes/s, timed over `repeats` copies after a warm-up."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return repeats * num_bytes / (time.perf_counter() - started)


def compute_read_bandwidth(gpu: bool) -> Bandwidth:
    """Read bandwidth of the compute device's memory (assumed; `llmrun bench` measures real speed)."""
    cached = _load_calibration().get("gpu_read_bytes_s" if gpu else "cpu_read_bytes_s")
    if cached:
        return Bandwidth(float(cached), True)
    return Bandwidth(ASSUMED_GPU_READ_BYTES_S if gpu else ASSUMED_CPU_READ_BYTES_S, False)


def disk_read_bandwidth() -> Bandwidth:
    cached = _load_calibration().get("disk_read_bytes_s")
    if cached:
        return Bandwidth(float(cached), True)
    return Bandwidth(ASSUMED_DISK_READ_BYTES_S, False)


def record_bandwidth(name: str, bytes_per_s: float) -> None:
    """Cache a bandwidth that a run or benchmark measured (e.g. disk_read_bytes_s)."""
    _save_calibration({name: bytes_per_s})


def current_rss_bytes() -> int:
    """The process's resident set size now."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (0 where unknown).

    Linux: VmHWM, which starts afresh at exec (ru_maxrss would carry the parent's peak over).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
