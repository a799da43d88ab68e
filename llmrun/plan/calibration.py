"""The machine's speed figures the estimate reads: the calibration file, first-use probes, refreshes.

Each figure is measured by a short probe on first use (memory read, disk read cold and from the page
cache, pinned host->GPU), replaced by what runs achieve (`record_figures`, called after a run or a
bench), or assumed when neither could be had. The file ($LLMRUN_HOME/calibration.json) is keyed by
machine and written atomically; a home that cannot be written only costs measuring again.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass

from llmrun.paths import cache_dir, calibration_file
from llmrun.plan.devices import has_cuda, measure_gpu_read, measure_host_to_gpu, probe_file_reads, probe_memory_read
from llmrun.storage import atomic_write_bytes

MiB = 1024**2
PROBE = "probe"          # a figure measured by a calibration probe on this machine
RUNS = "runs"            # a figure worked out from what a run achieved here
ASSUMED = "assumed"      # a default: neither measured nor learnt yet

# name -> the value assumed until measured (bytes/s, or seconds for the per-layer step costs)
ASSUMED_FIGURES = {
    "cpu_read_bytes_s": 20e9,           # RAM read bandwidth a small machine reaches in practice
    "gpu_read_bytes_s": 2.0e12,         # HBM-class read bandwidth
    "page_cache_read_bytes_s": 4e9,     # pread of a file the page cache holds (a memory copy)
    "disk_read_bytes_s": 1.4e9,         # uncached NVMe-class reads (ARCHITECTURE.md reference figure)
    "host_to_gpu_bytes_s": 20e9,        # pinned PCIe copies
    "cpu_unpacked_read_bytes_s": 3e9,   # 16-bit weights a CPU step computes as staged (streamed layers):
                                        # not prepacked, so oneDNN lays each out again per call
    "cpu_layer_step_s": 0.35e-3,        # per decoder layer and decode step, beyond reading its weights
    "gpu_layer_step_s": 0.01e-3,        # (kernel launches, small ops; CUDA graphs on a GPU)
}
_PROBE_FILE_BYTES = 64 * MiB
_MEMORY_PROBE_BYTES = 256 * MiB


@dataclass(frozen=True)
class Figure:
    """One speed figure (bytes/s, or seconds for a step cost) and where it came from."""

    value: float
    source: str          # PROBE | RUNS | ASSUMED

    @property
    def measured(self) -> bool:
        return self.source != ASSUMED


def step_figure_name(device: str) -> str:
    """The per-layer step cost's name; runs record it per dtype ("cpu_layer_step_s/bfloat16")."""
    return f"{device}_layer_step_s"


def _machine_key() -> str:
    return f"{platform.node()}|{platform.processor() or platform.machine()}"


def _read_file() -> dict:
    try:
        data = json.loads(calibration_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_figures() -> dict[str, Figure]:
    """This machine's figures from the calibration file (a bare number, the old form, is a probe's)."""
    entry = _read_file().get(_machine_key(), {})
    figures = {}
    for name, item in entry.items() if isinstance(entry, dict) else ():
        value, source = (item, PROBE) if not isinstance(item, dict) else (item.get("value"), item.get("source"))
        if not isinstance(value, (int, float)) or source not in (PROBE, RUNS):
            continue
        if value > 0 or (value == 0 and "_layer_step_s" in name):  # a step may cost nothing
            figures[name] = Figure(float(value), source)
    return figures


def record_figures(figures: dict[str, Figure]) -> None:
    """Add or replace figures in the calibration file, atomically; a failed write is ignored."""
    if not figures:
        return
    data = _read_file()
    entry = data.get(_machine_key())
    entry = dict(entry) if isinstance(entry, dict) else {}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, figure in figures.items():
        entry[name] = {"value": figure.value, "source": figure.source, "at": now}
    data[_machine_key()] = entry
    path = calibration_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(data, indent=2).encode())  # a full disk leaves no temp file
    except OSError:
        pass  # calibration is an optimisation; a read-only home only costs a re-measure


def record_bandwidth(name: str, bytes_per_s: float, source: str = RUNS) -> None:
    """Cache one figure a run or benchmark achieved (e.g. "disk_read_bytes_s")."""
    record_figures({name: Figure(float(bytes_per_s), source)})


def machine_figures(gpu: bool, probe: bool = True) -> dict[str, Figure]:
    """Every figure the estimate needs: cached, else probed now (first use) and saved, else assumed."""
    figures = load_figures()
    if probe:
        measured = _probe_missing(figures, gpu)
        record_figures(measured)
        figures.update(measured)
    return {**{name: Figure(assumed, ASSUMED) for name, assumed in ASSUMED_FIGURES.items()}, **figures}


def _probe_missing(figures: dict[str, Figure], gpu: bool) -> dict[str, Figure]:
    found = {}
    if "cpu_read_bytes_s" not in figures:
        found["cpu_read_bytes_s"] = Figure(probe_memory_read(_MEMORY_PROBE_BYTES), PROBE)
    if "disk_read_bytes_s" not in figures or "page_cache_read_bytes_s" not in figures:
        cold, warm = probe_file_reads(cache_dir() / "calibration-probe.bin", _PROBE_FILE_BYTES)
        if cold is not None and "disk_read_bytes_s" not in figures:
            found["disk_read_bytes_s"] = Figure(cold, PROBE)
        if warm is not None and "page_cache_read_bytes_s" not in figures:
            found["page_cache_read_bytes_s"] = Figure(warm, PROBE)
    if gpu and has_cuda():
        if "host_to_gpu_bytes_s" not in figures:
            found["host_to_gpu_bytes_s"] = Figure(measure_host_to_gpu(256 * MiB, repeats=4), PROBE)
        if "gpu_read_bytes_s" not in figures:
            found["gpu_read_bytes_s"] = Figure(measure_gpu_read(1024 * MiB, repeats=4), PROBE)
    return found
