"""Prepacking resident CPU matmul weights into oneDNN's blocked layout (bf16/fp16 decode speed).

oneDNN re-lays out a plain bf16 weight on every call; a packed weight skips that, which more than
doubles bf16 GEMV throughput on CPUs with AVX-512 BF16/AMX. Packed results are bit-identical to
F.linear for the row counts decoding and ordinary prefill chunks use (checked in tests).
"""

from __future__ import annotations


import torch

from llmrun import settings


def can_pack(dtype, device) -> bool:
    """Packing applies to 16-bit weights on CPU when oneDNN is there (LLMRUN_NO_PACK=1 turns it off)."""
    return (torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and torch.backends.mkldnn.is_available() and not settings.LLMRUN_NO_PACK.is_on())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The packed form of a 2-D [out, in] weight, or the weight itself where packing fails."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    except (RuntimeError, AttributeError):
        return weight
