"""Building and loading llmrun's C kernel libraries, and what ATen runs here that they must match.

A library is compiled on first use with the system C compiler ($CC, else cc or gcc) into the user
cache directory (paths.cache_dir()/native, keyed by the hash of its sources, compiler and flags),
written atomically, and loaded with ctypes; no compiler or a failed build gives None and the
caller runs ATen's ops instead. kernels/native.py and kernels/quant_cpu.py build theirs here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from llmrun import settings
from llmrun.paths import cache_dir

FLAGS = ("-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
GEMV_FLAGS = ("-fopenmp",)  # joins the libgomp PyTorch loaded: ATen's threads, no second pool


def c_compiler() -> Optional[str]:
    """The C compiler the kernels are built with ($CC, else cc or gcc on PATH), or None."""
    return settings.CC.text() or shutil.which("cc") or shutil.which("gcc")


def build_library(compiler: str, sources: tuple[Path, ...], flags: tuple[str, ...]) -> Optional[ctypes.CDLL]:
    """The library built from `sources` with `flags` (cached by their hash), or None where it fails."""
    text = b"".join(source.read_bytes() for source in sources)
    key = hashlib.sha256(text + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    folder = cache_dir() / "native"
    library = folder / f"kernels-{key}.so"
    try:
        if not library.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                built = Path(scratch) / library.name
                subprocess.run([compiler, *flags, "-o", str(built), *map(str, sources), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, library)  # atomic: a half-written library is never loaded
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError):
        return None


def aten_runs_avx512() -> bool:
    """Whether ATen runs its AVX-512 kernels here (its CPU capability, which ATEN_CPU_CAPABILITY
    can lower): the C kernels' AVX-512 code runs only then."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@lru_cache(maxsize=1)
def aten_exp_functions() -> dict[int, int]:
    """ATen's vectorised float exp (Sleef's, exported by libtorch_cpu) by vector width: the exp
    inside `F.silu`, so a fused SiLU gives its bits. Only widths this CPU runs (AVX2, AVX-512)."""
    capability = torch.backends.cpu.get_cpu_capability()
    widths = (16, 8) if aten_runs_avx512() else (8,) if capability == "AVX2" else ()
    if not widths or sys.platform != "linux" or platform.machine() != "x86_64":
        return {}
    try:
        libtorch = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    except OSError:
        return {}
    found = {}
    for width in widths:
        symbol = getattr(libtorch, f"Sleef_expf{width}_u10", None)
        if symbol is not None:
            found[width] = ctypes.cast(symbol, ctypes.c_void_p).value
    return found
