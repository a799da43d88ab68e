"""The CPU's quantized-matmul library (quant_kernels.c and its companions) built and declared for ctypes:
the decode kernel, the layer in one C call, the VNNI prompt GEMM and, where the compiler has them, the
AMX kernels. kernels/quant_cpu.py decides where each runs."""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from typing import Optional

from llmrun import settings
from llmrun.kernels.clib import FLAGS, GEMV_FLAGS, build_library, c_compiler
from llmrun.kernels.quant_layer import declare_quant_layer

SOURCE = Path(__file__).with_name("quant_kernels.c")
LAYER_SOURCE = Path(__file__).with_name("quant_layer.c")
AMX_SOURCE = Path(__file__).with_name("quant_amx.c")
AMX_INT_SOURCE = Path(__file__).with_name("quant_amx_int.c")
GEMM_SOURCE = Path(__file__).with_name("quant_gemm_vnni.c")


@lru_cache(maxsize=1)
def load_quant_library() -> Optional[ctypes.CDLL]:
    """quant_kernels.c built (once per source version, cached like native.py's library), or None."""
    compiler = c_compiler()
    lib = None
    for sources in ((SOURCE, LAYER_SOURCE, GEMM_SOURCE, AMX_SOURCE, AMX_INT_SOURCE),
                    (SOURCE, LAYER_SOURCE, GEMM_SOURCE)):  # a compiler without AMX: no AMX
        lib = lib or (None if compiler is None else build_library(compiler, sources, FLAGS + GEMV_FLAGS))
    if lib is None or not hasattr(lib, "quant_matmul"):  # (a non-x86-64 build has no kernels)
        return None
    declare_quant_layer(lib)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    if hasattr(lib, "quant_gemm_amx"):
        lib.quant_amx_ready.restype = i32
        lib.quant_gemm_amx.argtypes = [p, i64, i64, i64, p, p, p, i32, i64, p, i64, p, p, i64, p, i32]
        lib.quant_gemm_amx.restype = i32
        lib.quant_amx_tile_weight.argtypes = [p, p, p, i32, i64, i64, i64, p, i32]
        lib.quant_amx_tile_weight.restype = None
        lib.quant_amx_scratch.argtypes = [i64, i64, i32]
        lib.quant_amx_scratch.restype = i64
        lib.quant_amx_int_ready.restype = i32
        lib.quant_matmul_amx.argtypes = [p, i64, i64, i64, p, p, p, i64, i32, i64, p, i64, p, i32]
        lib.quant_matmul_amx.restype = i32
        lib.quant_amx_int_scratch.argtypes = [i64, i64, i32]
        lib.quant_amx_int_scratch.restype = i64
    lib.quant_supported.restype = i32
    lib.quant_row_scratch_bytes.argtypes = [i64, i64]
    lib.quant_row_scratch_bytes.restype = i64
    lib.quant_matmul.argtypes = [p, i64, i32, i64, i64, p, p, p, i64, i32, i64, p, i64, p, i32]
    lib.quant_matmul.restype = None
    lib.quant_gemm_vnni.argtypes = [p, i64, i64, i64, p, p, p, i64, i32, i64, p, i64, p, i32]
    lib.quant_gemm_vnni.restype = None
    lib.quant_gemm_vnni_scratch.argtypes = [i64, i64, i64, i32]
    lib.quant_gemm_vnni_scratch.restype = i64
    lib.quant_quantize_rows.argtypes = [p, i64, i64, i64, i64, i32, p]  # (these two: tests call them alone)
    lib.quant_quantize_rows.restype = i64
    lib.quant_panels_in_decode_order.argtypes = [p, i64, i64, i64, p, p, p, i64, i32, i64, p, i64, i32]
    lib.quant_panels_in_decode_order.restype = i32
    lib.quant_dequantize.argtypes = [p, p, p, i64, i64, i32, i64, p, i32, i32]
    lib.quant_dequantize.restype = None
    return lib


def amx_allowed() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA leaves AMX on (unset, ALL/DEFAULT, or an AMX level): capped below,
    llmrun's own AMX kernel stays off too, as if on a CPU without AMX (an AMD EPYC)."""
    cap = (settings.ONEDNN_MAX_CPU_ISA.text() or "").upper()
    return cap in ("", "ALL", "DEFAULT") or "AMX" in cap
