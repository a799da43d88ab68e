"""Self-check verdicts remembered per machine, so a kernel's check runs once, not at every start.

A check such as the bf16 GEMV's (does it give oneDNN's bits on data built to expose any other order
of sums?) depends only on the kernel's compiled code, the reference library's version and the CPU it
runs on — not on the model. Its answer is stored under the kernels' cache folder, keyed by all of
those: the compiled library's file name (which carries its source hash), torch's and oneDNN's
versions, the CPU's model name and feature flags, the thread count, and the check's own name and
shape. Anything changed makes a new key, so a stale verdict is never read. A verdict is a hint to
skip work, never a reason to run a kernel unchecked elsewhere: the cheap check on the real weight
(`_gemv_reads`) still runs every time. Unreadable or unwritable files only mean checking again.
A check forced to fail (LLMRUN_FAIL_CHECKS) bypasses the store both ways.
"""

from __future__ import annotations

import hashlib
import json
import platform
from functools import lru_cache
from pathlib import Path
from typing import Callable

from llmrun import settings
from llmrun.errors import StorageError
from llmrun.storage import atomic_write_bytes

FILE_NAME = "verdicts.json"


@lru_cache(maxsize=1)
def machine_identity() -> str:
    """The CPU's model name and feature flags, the architecture and the software that computes the
    reference sums (torch, its oneDNN), as one string."""
    import torch

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        fields = {}
        for line in lines:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        cpu += "|" + fields.get("model name", "") + "|" + fields.get("flags", "")
    except OSError:
        cpu += "|" + platform.processor()
    onednn = [line.strip() for line in torch.__config__.show().splitlines()
              if line.strip().startswith(("- Intel(R) oneDNN", "- Intel(R) oneAPI Math Kernel", "- Intel(R) Math Kernel", "- Intel(R) MKL-DNN"))]
    isa = f"aten {torch.backends.cpu.get_cpu_capability()}|onednn max isa {settings.ONEDNN_MAX_CPU_ISA.text()}"
    return f"{cpu}|torch {torch.__version__}|{' '.join(onednn)}|{isa}"


class VerdictStore:
    """Verdicts of the checks of one compiled library, in `folder`/verdicts.json."""

    def __init__(self, folder: Path, library_name: str):
        self.path = Path(folder) / FILE_NAME
        self.library_name = library_name
        self._verdicts: dict[str, bool] | None = None

    def key(self, check: str, detail: str, threads: int) -> str:
        text = f"{self.library_name}|{machine_identity()}|threads {threads}|{check}|{detail}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def verdict(self, check: str, detail: str, threads: int, run_check: Callable[[], bool]) -> bool:
        """The stored verdict for this check, else `run_check()`'s, stored for the next start."""
        key = self.key(check, detail, threads)
        known = self._load().get(key)
        if isinstance(known, bool):
            return known
        result = bool(run_check())
        self._verdicts[key] = result
        self._save()
        return result

    def _load(self) -> dict:
        if self._verdicts is None:
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                self._verdicts = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._verdicts = {}
        return self._verdicts

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, (json.dumps(self._verdicts, indent=0, sort_keys=True) + "\n").encode())
        except (OSError, StorageError):  # a read-only cache: the check simply runs again next time
            pass


@lru_cache(maxsize=None)
def store_beside(library_path: str) -> VerdictStore:
    """The verdict store of a compiled library (one per process): in its folder, keyed by its file name."""
    path = Path(library_path)
    return VerdictStore(path.parent, path.name)
