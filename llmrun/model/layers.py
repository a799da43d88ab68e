"""Shared decoder layers as functions: linear, RMSNorm variants, MLP activations, soft-capping."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmrun.errors import UnsupportedArchitectureError


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias); `weight` may be a oneDNN-packed CPU weight (see weights/packing.py)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_halves(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  matmul=linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of x @ weight.T (+ bias) along the last dim: a fused gate/up projection.

    A packed or CUDA weight runs one matmul and splits its result. A plain CPU weight runs one
    matmul per row half (each half is a contiguous weight of its own, no copy): both outputs are
    then contiguous, and MKL's fp32 GEMM over a 512-token prompt ran ~20 % faster that way for
    SmolLM2's MLP than one matmul over the fused rows followed by SiLU on a strided half.
    `matmul` runs a packed or CUDA weight's matmul (a decoder's kernel set may bring its own).
    """
    if weight.is_mkldnn or weight.device.type != "cpu":
        return matmul(x, weight, bias).chunk(2, dim=-1)
    half = weight.shape[0] // 2
    biases = (None, None) if bias is None else (bias[:half], bias[half:])
    return linear(x, weight[:half], biases[0]), linear(x, weight[half:], biases[1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled by `weight` in the input dtype (as transformers does;
    torch.rms_norm on float32 input gives the same bits as its pow/mean/rsqrt sequence).

    On the CPU, torch.rms_norm on 16-bit input upcasts internally and rounds once, the same bits
    again (tests/model/test_layers.py), with two fewer ops per call: decode runs 61 norms a token.
    """
    if x.device.type == "cpu":
        return weight * torch.rms_norm(x, (x.shape[-1],), eps=eps)
    return weight * torch.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps).to(x.dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x · (1 + w), the product taken in float32 before returning to x's dtype
    (Llama instead rounds x first and multiplies by w in the input dtype)."""
    normed = torch.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """tanh(x / cap) · cap: Gemma 2's logit soft-capping."""
    return torch.tanh(x / cap) * cap


def activation(name: str):
    """The MLP activation function for a config's `hidden_act` (or Gemma's `hidden_activation`)."""
    if name == "silu":
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise UnsupportedArchitectureError(f"activation {name!r} is not supported yet")
