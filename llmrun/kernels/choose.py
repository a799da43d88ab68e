"""Which kernel set a decoder gets on a device: the fused one there (C on the CPU, Triton on CUDA)
where the layer's math is one it computes and its self-check passed, else ATen's ops; and which
quantized matmul runs its compressed weights (kernels/quant_cpu.py, kernels/quant_gpu.py)."""

from __future__ import annotations

from typing import Optional

import torch

from llmrun import settings
from llmrun.kernels.interface import FusedKernels, Kernels, LayerShape
from llmrun.kernels.native import NativeKernels
from llmrun.kernels.quant import PLAIN, QuantMatmul
from llmrun.kernels.quant_cpu import CpuQuantMatmul


def kernels_for(shape: LayerShape, dtype: torch.dtype, device) -> Kernels:
    """The kernel set for layers of `shape` in `dtype` on `device` (LLMRUN_NO_NATIVE=1: ATen's ops,
    and quantized weights dequantized for each matmul)."""
    device = torch.device(device)
    fused = None
    quant = PLAIN if settings.LLMRUN_NO_NATIVE.is_on() else quant_matmul(device)
    if shape.fusable and not settings.LLMRUN_NO_NATIVE.is_on():
        fused = fused_kernels(shape, dtype, device, quant)
    return fused if fused is not None else Kernels(shape, dtype, device, quant)


def quant_matmul(device: torch.device) -> QuantMatmul:
    """The device's quantized matmul: C (VNNI for decode steps) on the CPU, Triton on CUDA (where it
    imports), else the reference. Each checks a weight format before its kernel runs it."""
    if device.type == "cpu":
        return CpuQuantMatmul()
    if device.type == "cuda":
        # imported here, not above: Triton takes a second to import (see fused_kernels)
        from llmrun.kernels.quant_gpu import TritonQuantMatmul

        return TritonQuantMatmul.for_device(device)
    return PLAIN


def fused_kernels(shape: LayerShape, dtype: torch.dtype, device: torch.device,
                  quant: QuantMatmul = PLAIN) -> Optional[FusedKernels]:
    """The device's fused set that passed its self-check on this shape and dtype, or None."""
    if device.type == "cuda":
        # imported here, not above: Triton takes a second to import and reads TRITON_INTERPRET when its
        # kernels are defined; runs on a CPU never load it
        from llmrun.kernels.gpu_kernels import TritonKernels

        return TritonKernels.for_decoder(dtype, device, shape, quant)
    if device.type == "cpu":
        return NativeKernels.for_decoder(dtype, device, shape, quant)
    return None
