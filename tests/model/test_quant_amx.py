"""The AMX GEMM for prompt chunks over quantized weights (kernels/quant_amx.c, quant_cpu.py's `gemm`): against
the exact product of what it multiplies and the reference's bound, a row's bits alone and among others
(the weight tiled in the call or once for a step, one thread or two), the tiled weight's layout, the bias, the
check that guards it, and the settings that keep it off. Where the CPU has no AMX (an AMD EPYC, or
tests/test_simulated_cpus.py's no_amx case) the tests that need it skip and the last ones show the
path taken instead (the VNNI GEMM, else dequantize-and-GEMM)."""

import pytest
import torch

from llmrun.kernels.quant_check import checked_on, probe_inputs, within_quant_bound
from llmrun.kernels.quant_cpu import DECODE_ROWS, CpuQuantMatmul
from llmrun.model.layers import linear
from llmrun.quant.format import QuantWeight, dequantize, pack_int4, unpack_int4
from tests.kernel_checks import amx_gemm_passes, amx_gemm_should_pass, quant_probe, torch_threads

# (bits, group, with mins): llmrun's int4 groups and the int8 forms (Q8_0, Q5_K, Q6_K, per channel: 0)
FORMATS = [(4, 32, True), (4, 64, True), (4, 128, True), (8, 32, False), (8, 32, True), (8, 16, False), (8, 0, False)]
IDS = [f"int{b}-g{g or 'row'}{'-mins' if m else ''}" for b, g, m in FORMATS]


def test_the_gemm_is_used_where_its_check_should_pass():
    """Where the library built it, the CPU has AMX and ONEDNN_MAX_CPU_ISA leaves AMX on, its check
    passes; elsewhere prompt chunks dequantize and run ATen's GEMM."""
    assert amx_gemm_passes() is amx_gemm_should_pass()


@pytest.fixture(scope="module")
def matmul():
    if not amx_gemm_passes():  # the tests below follow what the check decided here
        pytest.skip("the AMX GEMM is off here (no AMX, no compiler, or its check failed)")
    return CpuQuantMatmul()



def exact(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """What the kernel multiplies, multiplied exactly: bf16 rows by the weight rounded once to bf16."""
    return x.double() @ dequantize(qw).to(torch.bfloat16).double().T


@pytest.mark.parametrize("form", FORMATS, ids=IDS)
def test_the_gemm_is_the_reference_within_its_rounding(matmul, form):
    """SmolLM2's matmul shapes and an odd one, 17 to 300 rows (part-filled tiles of rows and of
    outputs): within the check's bound of the reference, and within float32 sums and one bf16
    rounding of the exact product."""
    bits, group, with_mins = form
    for out_features, in_features in [(960, 576), (576, 1536), (203, 192)]:
        if group and in_features % group:
            continue
        qw = quant_probe(bits, group, out_features, in_features, with_mins, seed=out_features)
        for rows in (DECODE_ROWS + 1, 100, 300):
            x = probe_inputs(rows, in_features, torch.bfloat16, torch.Generator().manual_seed(rows))
            actual = matmul.gemm(x, qw)
            assert actual.dtype == torch.bfloat16 and actual.shape == (rows, out_features)
            assert within_quant_bound(actual, x, qw, act_quantized=False, weight_rounded=True)
            expected = exact(x, qw)
            magnitude = x.double().abs() @ dequantize(qw).to(torch.bfloat16).double().abs().T
            assert ((actual.double() - expected).abs() <= 1e-5 * magnitude + expected.abs() * 2**-8 + 1e-30).all()


@pytest.mark.parametrize("form", FORMATS, ids=IDS)
def test_a_rows_bits_do_not_depend_on_its_company(matmul, form):
    """A row alone, among 40 rows and among 300, over one thread or two, with the weight dequantized in
    the call or tiled once for a step's chunks: the same bits (an output's sum runs over the inputs in
    one order whatever is computed beside it)."""
    bits, group, with_mins = form
    qw = quant_probe(bits, group, 203, 256, with_mins, seed=11)  # 203 outputs: a part-filled tile
    x = probe_inputs(300, 256, torch.bfloat16, torch.Generator().manual_seed(11))
    together = matmul.gemm(x, qw)
    tiled = matmul.amx_tiles(qw)
    for count in (1, 2):
        with torch_threads(count):
            assert torch.equal(matmul.gemm(x, qw, tiled=tiled), together)
            assert torch.equal(matmul.gemm(x[:40], qw), together[:40])
            assert torch.equal(matmul.gemm(x[33:73], qw, tiled=tiled), together[33:73])
            for r in (0, 17, 299):
                assert torch.equal(matmul.gemm(x[r:r + 1], qw), together[r:r + 1])


def test_the_tiled_weight_holds_the_dequantized_values(matmul):
    """amx_tiles: each block of 16 outputs, each step of 32 inputs, the 16 outputs' rows of 32 inputs
    as they lie (AMX's A layout), the values format.dequantize's rounded once to bf16."""
    qw = quant_probe(4, 32, 40, 64, True, seed=5)  # 40 outputs: three blocks, the last part-filled
    tiles = matmul.amx_tiles(qw).view(3, 2, 16, 32)  # [block][step][output][input]
    weight = torch.zeros(48, 64, dtype=torch.bfloat16)
    weight[:40] = dequantize(qw).to(torch.bfloat16)
    expected = weight.view(3, 16, 2, 32).permute(0, 2, 1, 3)  # [block][step][output][input]
    assert torch.equal(tiles, expected)


def test_the_bias_is_added_before_the_rounding_and_a_strided_input(matmul):
    """A bf16 bias goes into the float32 sums before they are rounded; a float32 bias is added after,
    as ATen would; an input that is a view with a wider stride reads only its own columns; a 14336-wide
    down projection (Llama 3 8B)."""
    qw = quant_probe(4, 64, 80, 14336, True, seed=2)
    wide = probe_inputs(20, 2 * 14336, torch.bfloat16, torch.Generator().manual_seed(2))
    x = wide[:, :14336]
    assert x.stride(0) == 2 * 14336
    assert torch.equal(matmul.gemm(x, qw), matmul.gemm(x.contiguous(), qw))
    bias = torch.randn(80, generator=torch.Generator().manual_seed(3)) * 1000
    expected = exact(x, qw) + bias.to(torch.bfloat16).double()
    actual = matmul.gemm(x, qw, bias.to(torch.bfloat16))
    magnitude = x.double().abs() @ dequantize(qw).to(torch.bfloat16).double().abs().T
    assert ((actual.double() - expected).abs() <= 1e-5 * magnitude + expected.abs() * 2**-8).all()
    assert torch.equal(matmul.gemm(x, qw, bias), matmul.gemm(x, qw) + bias)


@pytest.mark.parametrize("mutation", ["swapped nibbles", "mins dropped", "groups shifted"])
def test_the_check_refuses_a_gemm_that_misreads_the_format(mutation):
    """With the weight's rounding to bf16 in the bound, what a GEMM that read the format wrongly would
    give still falls outside it, and the right weight rounded to bf16 stays inside."""

    def rounded(x, qw):
        return (x.float() @ dequantize(qw).to(torch.bfloat16).float().T).to(x.dtype)

    def misread(x, qw):
        if mutation == "swapped nibbles":
            q = unpack_int4(qw.qweight).reshape(qw.out_features, -1, 2).flip(-1).reshape(qw.out_features, -1)
            wrong = QuantWeight(4, qw.group_size, qw.out_features, qw.in_features, pack_int4(q), qw.scales, qw.mins)
        elif mutation == "mins dropped":
            wrong = QuantWeight(4, qw.group_size, qw.out_features, qw.in_features, qw.qweight, qw.scales,
                                torch.zeros_like(qw.mins))
        else:
            wrong = QuantWeight(4, qw.group_size, qw.out_features, qw.in_features, qw.qweight,
                                qw.scales.roll(1, dims=1), qw.mins.roll(1, dims=1))
        return rounded(x, wrong)

    rows = (DECODE_ROWS + 1, 70)
    assert checked_on(rounded, 4, 32, 576, torch.bfloat16, act_quantized=False, name="test", rows=rows,
                      weight_rounded=True)
    assert not checked_on(misread, 4, 32, 576, torch.bfloat16, act_quantized=False, name="test", rows=rows,
                          weight_rounded=True)


@pytest.mark.parametrize("setting", [("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16"), ("LLMRUN_FAIL_CHECKS", "amx")])
def test_oneDNN_held_below_amx_or_a_failed_check_keeps_it_off(monkeypatch, setting):
    """ONEDNN_MAX_CPU_ISA below AMX (as on a CPU without it) or the check failed on purpose: prompt
    chunks run as on a CPU without AMX: the VNNI GEMM where its check passed, else ATen's GEMM over the
    weight dequantized."""
    monkeypatch.setenv(*setting)
    matmul = CpuQuantMatmul()
    if matmul.lib is None:
        pytest.skip("no C compiler here: prompt chunks run the reference")
    assert not matmul.gemm_checked(4, 32, 576)
    qw = quant_probe(4, 32, 64, 576, True, seed=3)
    x = probe_inputs(DECODE_ROWS + 1, 576, torch.bfloat16, torch.Generator().manual_seed(3))
    vnni = matmul.vnni_gemm_checked(4, 32, 576)
    expected = matmul.vnni_gemm(x, qw) if vnni else linear(x, dequantize(qw).to(torch.bfloat16))
    assert torch.equal(matmul.linear(x, qw), expected)
    assert not matmul.gemm_ran
    assert matmul.describe().get("quant_prompt_kernel", "dequantize+GEMM") == (
        "C int8-activation VNNI GEMM" if vnni else "dequantize+GEMM")
