"""Dtype and context policy: the run dtype for --dtype on a device, its bytes, the context length."""

from __future__ import annotations

from typing import Optional

from llmrun.errors import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_TAGS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}   # safetensors' names for them
DEFAULT_MAX_CONTEXT = 4096


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX); read without torch."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def dtype_name(name: str, device: str) -> str:
    """The concrete dtype for --dtype; auto is bfloat16 where the hardware computes it natively."""
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    if name != "auto":
        return name
    if device.startswith("cuda"):
        from llmrun.plan.devices import has_cuda

        if not has_cuda():
            return "float16"  # planning for a GPU this machine lacks: fp16 runs on every CUDA GPU
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def context_length(requested: Optional[int], model_max: int) -> int:
    """The context to plan for: --ctx checked against the model's maximum, else that maximum capped."""
    if requested is None:
        return min(model_max, DEFAULT_MAX_CONTEXT)
    if requested < 2:
        raise UsageError(f"--ctx must be at least 2 tokens, got {requested}")
    if requested > model_max:
        raise UsageError(f"--ctx {requested} is beyond the model's maximum context of {model_max} tokens")
    return requested
