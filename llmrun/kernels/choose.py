"""Which kernel set a decoder gets on a device: the fused one there (C on the CPU, Triton on CUDA)
where the layer's math is one it computes and its self-check passed, else ATen's ops."""

from __future__ import annotations

from typing import Optional

import torch

from llmrun import settings
from llmrun.kernels.interface import FusedKernels, Kernels, LayerShape
from llmrun.kernels.native import NativeKernels


def kernels_for(shape: LayerShape, dtype: torch.dtype, device) -> Kernels:
    """The kernel set for layers of `shape` in `dtype` on `device` (LLMRUN_NO_NATIVE=1: ATen's ops)."""
    device = torch.device(device)
    fused = None
    if shape.fusable and not settings.LLMRUN_NO_NATIVE.is_on():
        fused = fused_kernels(shape, dtype, device)
    return fused if fused is not None else Kernels(shape, dtype, device)


def fused_kernels(shape: LayerShape, dtype: torch.dtype, device: torch.device) -> Optional[FusedKernels]:
    """The device's fused set that passed its self-check on this shape and dtype, or None."""
    if device.type == "cuda":
        # imported here, not above: Triton takes a second to import and reads TRITON_INTERPRET when its
        # kernels are defined; runs on a CPU never load it
        from llmrun.kernels.gpu_kernels import TritonKernels

        return TritonKernels.for_decoder(dtype, device, shape)
    if device.type == "cpu":
        return NativeKernels.for_decoder(dtype, device, shape)
    return None
