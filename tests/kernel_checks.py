"""What the CPU kernels' self-checks decide on this machine, asked of the library and of oneDNN: tests
follow these answers, never CPU flags, so they hold where a feature is absent or a check fails
(tests/test_simulated_cpus.py runs them with AMX, AVX-512, the GEMV's check or the compiler taken away)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from llmrun.kernels.interface import check_forced_to_fail
from llmrun.kernels.clib import aten_runs_avx512
from llmrun.kernels.native import LayerShape, NativeKernels, load_library
from llmrun.kernels.native_layer import blas_sgemm
from llmrun.kernels.quant_check import probe_weight
from llmrun.kernels.quant_cpu import CpuQuantMatmul
from llmrun.kernels.quant_library import amx_allowed, load_quant_library
from llmrun.quant.format import QuantWeight
from llmrun.weights.packing import pack_weight

# tests.checkpoints.llama_config(): its layer, and its matmuls (out x in) one sequence's steps run
TINY_SHAPE = LayerShape(64, 4, 2, 16, 1e-5, intermediate_size=128)
TINY_MATMULS = ((128, 64), (64, 64), (256, 64), (64, 128), (320, 64))  # qkv, o, gate/up, down, head


def c_kernels(dtype: torch.dtype, shape: LayerShape = TINY_SHAPE) -> Optional[NativeKernels]:
    """The C kernel set a decoder of this shape gets here, or None (no compiler, a failed check)."""
    return NativeKernels.for_decoder(dtype, torch.device("cpu"), shape)


def gemv_passes(n: int, k: int) -> bool:
    """Whether the bf16 GEMV passed its check against oneDNN on a packed [n, k] weight."""
    kernels = c_kernels(torch.bfloat16)
    weight = pack_weight((torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05)
                         .to(torch.bfloat16))
    return kernels is not None and kernels.gemv and weight.is_mkldnn and kernels._gemv_checked(weight)


def layer_passes(shape: LayerShape = TINY_SHAPE) -> bool:
    """Whether the float32 layer in one C call passed its attention check for this shape."""
    kernels = c_kernels(torch.float32, shape)
    return kernels is not None and kernels.layer is not None


def onednn_bf16_kernel() -> str:
    """The implementation oneDNN runs for a packed bf16 matmul of one row (its verbose log's name,
    e.g. `brg_matmul:avx10_1_512_amx`), honouring ONEDNN_MAX_CPU_ISA; "" where nothing is packed."""
    weight = pack_weight(torch.randn(128, 64).to(torch.bfloat16))
    if not weight.is_mkldnn:
        return ""
    x = torch.randn(1, 64).to(torch.bfloat16)
    with tempfile.TemporaryFile() as log:
        saved = os.dup(1)  # oneDNN prints its log on file descriptor 1
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = [line for line in log.read().decode().splitlines() if ",exec,cpu," in line]
    return lines[-1].split(",")[6] if lines else ""


def gemv_should_pass() -> bool:
    """Where the GEMV's check must pass: its instructions are allowed (ATen runs AVX-512), oneDNN runs
    its AMX kernel (the order the GEMV reproduces) and the check is not failed on purpose."""
    return (load_library() is not None and aten_runs_avx512() and "amx" in onednn_bf16_kernel()
            and not check_forced_to_fail("gemv"))


def layer_should_pass() -> bool:
    """Where the float32 layer's check must pass: an OpenMP build with the layer, ATen on AVX-512 (the
    flash attention it reproduces), MKL's sgemm_ exported, and the check not failed on purpose."""
    lib = load_library()
    return (lib is not None and hasattr(lib, "decode_layer_f32") and aten_runs_avx512()
            and blas_sgemm() is not None and not check_forced_to_fail("layer"))


def quant_kernel_passes(bits: int = 4, group_size: int = 32, in_features: int = 576,
                        dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the CPU's quantized decode kernel (VNNI, kernels/quant_cpu.py) passed its check on this format."""
    return CpuQuantMatmul().kernel_checked(bits, group_size, in_features, dtype)


def quant_kernel_should_pass() -> bool:
    """Where that check must pass: the library built, the CPU has AVX-512 VNNI (the library's own
    answer), ATen runs AVX-512, and the check is not failed on purpose."""
    lib = load_quant_library()
    return (lib is not None and bool(lib.quant_supported()) and aten_runs_avx512()
            and not check_forced_to_fail("quant"))


def vnni_gemm_passes(bits: int = 4, group_size: int = 32, in_features: int = 576) -> bool:
    """Whether the CPU's VNNI GEMM for quantized prompt chunks (kernels/quant_gemm_vnni.c) passed its check."""
    return CpuQuantMatmul().vnni_gemm_checked(bits, group_size, in_features)


def vnni_gemm_should_pass() -> bool:
    """Where that check must pass: where the decode kernel's must (the same instructions and activation
    rounding), unless it is failed on purpose."""
    return quant_kernel_should_pass() and not check_forced_to_fail("vnni_gemm")


def amx_gemm_passes(bits: int = 4, group_size: int = 32, in_features: int = 576) -> bool:
    """Whether the CPU's AMX GEMM for quantized prompt chunks (kernels/quant_amx.c) passed its check."""
    return CpuQuantMatmul().gemm_checked(bits, group_size, in_features)


def amx_gemm_should_pass() -> bool:
    """Where that check must pass: the library built with it, the CPU has AMX bf16 and Linux grants its
    state (the library's own answer), ONEDNN_MAX_CPU_ISA leaves AMX on, and the check is not failed on
    purpose."""
    lib = load_quant_library()
    return (lib is not None and hasattr(lib, "quant_gemm_amx") and bool(lib.quant_amx_ready()) and amx_allowed()
            and not check_forced_to_fail("amx"))


def quant_probe(bits: int, group: int, out_features: int, in_features: int, with_mins: bool,
                seed: int) -> QuantWeight:
    """A check's probe weight of this format (group 0: one group a row, int8 per output channel)."""
    return probe_weight(bits, group or in_features, out_features, in_features, with_mins,
                        torch.Generator().manual_seed(seed))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's thread count set to `count` within the scope (the kernels split their work by it), then
    put back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
