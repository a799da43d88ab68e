"""The Triton GEMV over packed int4/int8 weights (kernels/quant_gpu.py), run by Triton's interpreter on CPU
tensors where there is no GPU (skipped where triton is not installed), against the reference."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined
triton = pytest.importorskip("triton")

from llmrun.kernels.quant import quant_linear  # noqa: E402
from llmrun.kernels.quant_check import checked_on, probe_inputs, probe_weight, within_quant_bound  # noqa: E402
from llmrun.kernels.quant_gpu import TritonQuantMatmul, quant_gemv  # noqa: E402
from llmrun.quant.format import QuantWeight, dequantize, pack_int4, unpack_int4  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter rounds to bfloat16 its own way (numpy has no bfloat16): that dtype on a GPU only.
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE.type == "cuda" else ())
FORMATS = [(4, 32, True), (4, 128, True), (8, 32, False), (8, 16, True), (8, 0, False)]


def ids(form):
    return f"int{form[0]}-g{form[1] or 'row'}{'-mins' if form[2] else ''}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMATS, ids=ids)
@pytest.mark.parametrize("in_features", [576, 384])  # SmolLM2's hidden size; 3 groups of 128 (both: masked blocks)
def test_the_gemv_is_the_reference_within_float32_sums(form, dtype, in_features):
    bits, group, with_mins = form
    if group and in_features % group:
        pytest.skip("576 inputs do not take groups of 128")
    group = group or in_features
    qw = probe_weight(bits, group, 48, in_features, with_mins, torch.Generator().manual_seed(in_features + group))
    x = (probe_inputs(1, in_features, torch.float32, torch.Generator().manual_seed(5)) * 1e-2).to(dtype)
    actual = quant_gemv(x.to(DEVICE), qw.to(DEVICE))
    assert actual.dtype == dtype and actual.shape == (1, 48)
    assert within_quant_bound(actual, x, qw, act_quantized=False)


def test_the_check_refuses_a_gemv_that_swaps_nibbles():
    def swapped(x, qw):
        q = unpack_int4(qw.qweight.cpu()).reshape(qw.out_features, -1, 2).flip(-1).reshape(qw.out_features, -1)
        return quant_gemv(x, QuantWeight(4, qw.group_size, qw.out_features, qw.in_features, pack_int4(q).to(x.device),
                                         qw.scales, qw.mins))

    assert checked_on(quant_gemv, 4, 32, 192, torch.float32, act_quantized=False, name="t", device=DEVICE, rows=(1,))
    assert not checked_on(swapped, 4, 32, 192, torch.float32, act_quantized=False, name="t", device=DEVICE, rows=(1,))


def test_one_row_runs_the_gemv_and_more_rows_dequantize():
    matmul = TritonQuantMatmul(DEVICE)
    qw = probe_weight(4, 64, 40, 192, True, torch.Generator().manual_seed(9)).to(DEVICE)
    one = probe_inputs(1, 192, torch.float32, torch.Generator().manual_seed(9)).to(DEVICE)
    assert torch.equal(matmul.linear(one, qw), quant_gemv(one, qw))
    assert matmul.ran and matmul.describe()["quant_formats"] == ["int4 g64 k192"]
    rows = probe_inputs(3, 192, torch.float32, torch.Generator().manual_seed(10)).to(DEVICE)
    assert torch.equal(matmul.linear(rows, qw), torch.nn.functional.linear(rows, dequantize(qw)))
    assert torch.allclose(quant_linear(rows, qw), matmul.linear(rows, qw))
