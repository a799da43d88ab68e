"""The VNNI GEMM for prompt chunks over quantized weights (kernels/quant_gemm_vnni.c, quant_cpu.py's
`vnni_gemm`), which runs them where the CPU has AVX-512 VNNI but no AMX: against the exact product of
what it multiplies (activations rounded to int8 per block of 32, the decode kernel's rounding) and the
reference's bound, a row's bits alone and among others (one thread or two, any row count), outputs that
are not a multiple of 16, a strided input and a bias, and the setting that keeps it off."""

import pytest
import torch

from llmrun.kernels.quant_check import probe_inputs, term_magnitudes, within_quant_bound
from llmrun.kernels.quant_cpu import DECODE_ROWS, CpuQuantMatmul
from llmrun.model.layers import linear
from llmrun.quant.format import dequantize
from tests.kernel_checks import quant_probe, torch_threads, vnni_gemm_passes, vnni_gemm_should_pass
from tests.model.test_quant_kernels import emulated

# (bits, group, with mins): llmrun's int4 groups, the int8 forms a GGUF maps to with units of 32 (Q8_0,
# Q5_K) and per-channel int8 (group 0); int8 groups of 16 (Q6_K) dequantize instead (the last test)
FORMATS = [(4, 32, True), (4, 64, True), (4, 128, True), (8, 32, False), (8, 32, True), (8, 64, False), (8, 0, False)]
IDS = [f"int{b}-g{g or 'row'}{'-mins' if m else ''}" for b, g, m in FORMATS]
SHAPES = [(960, 576), (3072, 576), (576, 1536), (203, 768)]  # SmolLM2's qkv, gate/up, down; 203 outputs


def test_the_gemm_is_used_where_its_check_should_pass():
    """Where the decode kernel's check must pass (the library, AVX-512 VNNI, ATen on AVX-512), so must
    this one's (unless failed on purpose); elsewhere prompt chunks dequantize for ATen's GEMM."""
    assert vnni_gemm_passes() is vnni_gemm_should_pass()


@pytest.fixture(scope="module")
def matmul():
    if not vnni_gemm_passes():  # the tests below follow what the check decided here
        pytest.skip("the VNNI prompt GEMM is off here (no compiler, no AVX-512 VNNI, or its check failed)")
    return CpuQuantMatmul()


@pytest.mark.parametrize("form", FORMATS, ids=IDS)
def test_the_gemm_is_the_reference_within_its_rounding(matmul, form):
    """Within the check's bound of the reference, and within float32 sums and one bf16 rounding of the
    exact product of the int8-rounded activations and the weight, for prompt-sized row counts."""
    bits, group, with_mins = form
    for out_features, in_features in SHAPES:
        if group and in_features % group:
            continue
        qw = quant_probe(bits, group, out_features, in_features, with_mins, seed=out_features + in_features)
        assert matmul.vnni_gemm_checked(bits, qw.group_size, in_features)
        for rows in (DECODE_ROWS + 1, 70, 128):
            x = probe_inputs(rows, in_features, torch.bfloat16, torch.Generator().manual_seed(rows))
            actual = matmul.vnni_gemm(x, qw)
            assert actual.dtype == torch.bfloat16 and actual.shape == (rows, out_features)
            assert within_quant_bound(actual, x, qw, act_quantized=True)
            expected = emulated(x, qw)
            slack = 1e-5 * (x.double().abs() @ term_magnitudes(qw).T) + expected.abs() * 2**-8 + 1e-30
            assert ((actual.double() - expected).abs() <= slack).all()


@pytest.mark.parametrize("form", FORMATS, ids=IDS)
def test_a_rows_bits_do_not_depend_on_its_company(matmul, form):
    """A row alone, in passes of 8, 4, 2 and 1 rows, split over one thread or two: the same bits (each
    output of each row is summed unit by unit in one order, whatever is computed beside it)."""
    bits, group, with_mins = form
    qw = quant_probe(bits, group, 203, 768, with_mins, seed=13)
    x = probe_inputs(45, 768, torch.bfloat16, torch.Generator().manual_seed(13))
    together = matmul.vnni_gemm(x, qw)
    for count in (1, 2):
        with torch_threads(count):
            for r in (0, 17, 44):
                assert torch.equal(matmul.vnni_gemm(x[r:r + 1], qw), together[r:r + 1])
            for start, end in ((3, 6), (8, 10), (2, 9), (5, 40)):
                assert torch.equal(matmul.vnni_gemm(x[start:end], qw), together[start:end])


def test_prompt_chunks_take_it_with_a_strided_input_and_a_bias(matmul):
    """`linear` sends more rows than a decode step here (where the AMX GEMM is not there first); a view
    with a wider stride gives the contiguous input's bits, and the bias is added after."""
    qw = quant_probe(4, 32, 200, 768, True, seed=9)
    wide = probe_inputs(DECODE_ROWS + 3, 2 * 768, torch.bfloat16, torch.Generator().manual_seed(9))
    x = wide[:, :768]
    bias = torch.randn(200, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    assert torch.equal(matmul.vnni_gemm(x, qw), matmul.vnni_gemm(x.contiguous(), qw))
    fresh = CpuQuantMatmul()
    if fresh.gemm_checked(4, 32, 768):
        pytest.skip("the AMX GEMM runs prompt chunks here (tests/model/test_quant_amx.py)")
    assert torch.equal(fresh.linear(x, qw, bias), matmul.vnni_gemm(x, qw) + bias)
    report = fresh.describe()
    assert fresh.vnni_gemm_ran and report["quant_prompt_kernel"] == "C int8-activation VNNI GEMM"
    assert report["quant_formats"] == []  # the decode kernel's formats: no decode step ran (not the GEMM's check)


def test_int8_groups_of_16_dequantize_for_the_gemm(matmul):
    """Units of 16 (Q6_K's int8 groups) are not this kernel's: such a weight's prompt chunks run
    ATen's GEMM over it dequantized (or the AMX GEMM)."""
    assert not matmul.vnni_gemm_checked(8, 16, 768)


def test_a_check_failed_on_purpose_keeps_it_off(monkeypatch):
    """LLMRUN_FAIL_CHECKS=vnni_gemm,amx: prompt chunks dequantize the weight for ATen's GEMM."""
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "vnni_gemm,amx")
    fresh = CpuQuantMatmul()
    if fresh.lib is None:
        pytest.skip("no C compiler here: prompt chunks run the reference")
    assert not fresh.vnni_gemm_checked(4, 32, 576)
    qw = quant_probe(4, 32, 64, 576, True, seed=3)
    x = probe_inputs(DECODE_ROWS + 1, 576, torch.bfloat16, torch.Generator().manual_seed(3))
    assert torch.equal(fresh.linear(x, qw), linear(x, dequantize(qw).to(torch.bfloat16)))
    assert not fresh.vnni_gemm_ran and fresh.describe().get("quant_prompt_kernel") == "dequantize+GEMM"
