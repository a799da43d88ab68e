"""Shared layers: linear_halves (a fused gate/up projection split in two) and rms_norm's bits."""

import pytest
import torch
import torch.nn.functional as F

from llmrun.model.layers import linear_halves, rms_norm
from llmrun.weights.packing import pack_weight


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_halves_equal_the_split_of_one_matmul(rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(96, 40), torch.randn(rows, 40)
    bias = torch.randn(96) if with_bias else None
    gate, up = linear_halves(x, weight, bias)
    expected = F.linear(x, weight, bias)
    assert gate.shape == up.shape == (rows, 48)
    assert gate.is_contiguous() and up.is_contiguous()  # plain CPU weight: one matmul per half
    torch.testing.assert_close(gate, expected[:, :48], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(up, expected[:, 48:], rtol=1e-6, atol=1e-6)


def test_packed_weight_gives_the_same_bits_as_plain_linear():
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64).to(torch.bfloat16), torch.randn(1, 64).to(torch.bfloat16)
    packed = pack_weight(weight)
    if not packed.is_mkldnn:
        pytest.skip("oneDNN cannot pack bf16 weights on this CPU")
    gate, up = linear_halves(x, packed)
    expected = F.linear(x, weight)
    assert torch.equal(gate, expected[:, :48]) and torch.equal(up, expected[:, 48:])


def transformers_rms_norm(x, weight, eps):
    """LlamaRMSNorm.forward, written out."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return weight * (hidden * torch.rsqrt(variance + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,dim", [(1, 576), (3, 64), (128, 3072)])
def test_rms_norm_gives_transformers_bits(dtype, rows, dim):
    torch.manual_seed(rows * dim)
    for scale in (0.01, 1.0, 30.0):
        x = (torch.randn(rows, dim) * scale).to(dtype)
        weight = (torch.randn(dim) * 0.3 + 1).to(dtype)
        assert torch.equal(rms_norm(x, weight, 1e-5), transformers_rms_norm(x, weight, 1e-5))
