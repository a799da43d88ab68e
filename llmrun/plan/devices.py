"""Measuring the machine: free GPU memory, available RAM, free disk, read and copy bandwidths, our RSS.

The only caller of torch.cuda.mem_get_info, psutil and shutil.disk_usage, and the home of the
short bandwidth probes plan/calibration.py runs on first use. CUDA is never initialised when no
NVIDIA driver is present.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmrun.plan.residency import drop_from_page_cache, resident_fraction
from llmrun.storage import atomic_write_bytes

MiB = 1024**2


@dataclass(frozen=True)
class MeasuredMemory:
    gpu_free_bytes: Optional[int]       # None: no usable CUDA device
    gpu_name: Optional[str]
    cpu_available_bytes: int
    disk_free_bytes: Optional[int]


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


def probe_memory_read(num_bytes: int, repeats: int = 3) -> float:
    """Bytes/s of one pass over `num_bytes` of RAM, split over this process's CPUs (best of `repeats`)."""
    import numpy as np

    data = np.ones(num_bytes // 8, dtype=np.uint64)
    num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parts = np.array_split(data, num_threads)
    best = float("inf")
    with ThreadPoolExecutor(num_threads) as pool:  # numpy's reductions let go of the GIL
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def probe_file_reads(file: Path, num_bytes: int, chunk_bytes: int = 4 * MiB) -> tuple[float | None, float | None]:
    """(cold, page cache) read rates in bytes/s of a scratch file llmrun keeps under its cache folder,
    read with pread as the disk reader reads. Cold is None where the page cache would not let go of
    the file (so nothing cold could be timed); both None where the file cannot be written."""
    try:
        if not file.exists() or file.stat().st_size != num_bytes:
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(file, (bytes(range(256)) * (num_bytes // 256 + 1))[:num_bytes])
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return None, None
    try:
        os.fsync(fd)  # dirty pages stay in the page cache; written back, they can be dropped
        drop_from_page_cache(fd)
        left = resident_fraction([(file, 0, num_bytes)])
        cold_s = _time_reads(fd, num_bytes, chunk_bytes)
        warm_s = min(_time_reads(fd, num_bytes, chunk_bytes) for _ in range(2))
    except OSError:
        return None, None
    finally:
        os.close(fd)
    cold = num_bytes / cold_s if left is not None and left < 0.05 else None
    return cold, num_bytes / warm_s


def _time_reads(fd: int, num_bytes: int, chunk_bytes: int) -> float:
    buffer = memoryview(bytearray(chunk_bytes))
    started = time.perf_counter()
    for offset in range(0, num_bytes, chunk_bytes):
        os.preadv(fd, [buffer[:min(chunk_bytes, num_bytes - offset)]], offset)
    return time.perf_counter() - started


def measure_gpu_read(num_bytes: int, repeats: int) -> float:
    """GPU memory read bandwidth in bytes/s: device-to-device copies (each reads and writes the bytes)."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * repeats * num_bytes / (time.perf_counter() - started)


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
