"""The quantized matmul: `quant_linear(x, qw)` over a QuantWeight (llmrun/quant/format.py), its reference, and
the interface (`QuantMatmul`) every faster implementation of it has.

The reference is THE definition: dequantize the weight to float32 (format.dequantize), then a plain
matmul. Faster implementations (kernels/quant_cpu.py: C with int8 activations and VNNI, and a GEMM over
the weight dequantized once for prompt chunks; kernels/quant_gpu.py: a Triton GEMV that dequantizes in registers) sum in
another order, and some round the activations to int8 per block of 32 inputs first, so they cannot
give the reference's bits. Each is checked instead against a bound on what its arithmetic may change
(kernels/quant_check.py), on data built so that a wrong nibble, scale, min or group shows far outside it.
kernels/choose.py hands a decoder's kernel set one `QuantMatmul` per device; a decoder never imports one.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from llmrun.quant.format import QuantWeight, chunk_rows, dequantize, row_slices


def quant_linear(x: torch.Tensor, qw: QuantWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference: x @ dequantize(qw).T (+ bias), in float32 on x's device, returned in x's dtype.
    The weight is dequantized `chunk_rows` outputs at a time (each output's sum is its own): the whole
    of an output head at once would hold float32 copies of it several times its compressed size beside
    the model, past what a plan reserves (one matrix in the run dtype)."""
    xf = x.to(torch.float32)
    rows = min(chunk_rows(qw.in_features), qw.out_features)
    piece = torch.empty((rows, qw.in_features), dtype=torch.float32, device=qw.qweight.device)  # every piece's
    outs = [F.linear(xf, dequantize(part, piece[: part.out_features]).to(x.device),
                     None if bias is None else bias[start : start + part.out_features].to(torch.float32))
            for start, part in row_slices(qw, rows)]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)).to(x.dtype)


class QuantMatmul:
    """How one device runs quant_linear: the reference here, faster ways in subclasses. `linear` is
    what a kernel set calls for every QuantWeight it meets."""

    name = "dequantize+matmul"

    def linear(self, x: torch.Tensor, qw: QuantWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return quant_linear(x, qw, bias)

    def sharing_dequantized(self):
        """A scope (one layer of forwards run in lockstep) in which a weight dequantized for a prompt
        chunk is kept for the next chunk that needs it; nothing is kept here."""
        return nullcontext()

    def layer_for(self, kernels):
        """A whole decode layer over quantized weights in one call for this kernel set, where this
        device has one (kernels/quant_layer.py on the CPU); None: the layer runs op by op."""
        return None

    def describe(self) -> dict:
        """What ran the quantized matmuls, for reports (`llmrun bench`): nothing to say here (the
        reference keeps no record; faster ones report once a QuantWeight met them)."""
        return {}


PLAIN = QuantMatmul()  # the reference, valid on every device


def quant_parts(qw: QuantWeight) -> list[torch.Tensor]:
    """The tensors a QuantWeight holds (qweight, scales and mins where it has them)."""
    return [qw.qweight, qw.scales] + ([] if qw.mins is None else [qw.mins])
