"""The quantized matmuls on the CPU (kernels/quant_cpu.py): the VNNI decode kernel against the reference
(dequantize then matmul) and against an emulation of its own arithmetic, the check that guards it, and
the prompt path's dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from llmrun.kernels.quant import PLAIN, quant_linear
from llmrun.kernels.quant_check import ACT_BLOCK, checked_on, probe_inputs, term_magnitudes, within_quant_bound
from llmrun.kernels.quant_cpu import DECODE_ROWS, CpuQuantMatmul
from llmrun.kernels.quant_library import load_quant_library
from llmrun.model.layers import linear
from llmrun.quant.format import QuantWeight, chunk_rows, dequantize, pack_int4, unpack_int4
from llmrun.quant.spec import CPU_AMX_LARGE_BYTES, CPU_AMX_LARGE_ROWS, CPU_AMX_ROWS
from tests.kernel_checks import quant_kernel_passes, quant_kernel_should_pass, quant_probe, torch_threads

DTYPES = [torch.float32, torch.bfloat16]
# (bits, group, with mins): llmrun's int4 groups, and the int8 forms a GGUF maps to (Q8_0 g32, Q5_K g32
# with mins, Q6_K g16) and llmrun's per-channel int8 (group = inputs: 0 here)
FORMATS = [(4, 32, True), (4, 64, True), (4, 128, True), (8, 32, False), (8, 32, True), (8, 16, False),
           (8, 64, False), (8, 0, False)]
FORM_ID = lambda f: f"int{f[0]}-g{f[1] or 'row'}{'-mins' if f[2] else ''}"  # noqa: E731
SMOLLM2_MATMULS = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate/up, down


def test_the_kernel_is_used_where_its_check_should_pass():
    """Where the library builds, the CPU has AVX-512 VNNI and ATen runs AVX-512, the kernel's check
    passes; elsewhere (tests/test_simulated_cpus.py takes each away) the prompt path runs every row."""
    assert quant_kernel_passes() is quant_kernel_should_pass()


@pytest.fixture(scope="module")
def matmul():
    if not quant_kernel_passes():  # the tests below follow what the check decided here
        pytest.skip("the quantized decode kernel is off here (no compiler, no AVX-512 VNNI, or its check failed)")
    return CpuQuantMatmul()



def emulated(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """The kernel's arithmetic in float64: each block of 32 activations rounded to int8 with scale
    max|x| / 127 (the float32 steps as the C code takes them), then the exact dot product."""
    blocks = x.float().reshape(x.shape[0], -1, ACT_BLOCK)  # [rows, blocks, 32]
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # (a scalar / tensor is not IEEE's)
    q = torch.round(blocks * inverse).clamp(-127, 127)  # round half to even, as nearbyintf
    rounded = ((amax / 127.0).double() * q.double()).reshape(x.shape)
    return rounded @ dequantize(qw).double().T


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMATS, ids=lambda f: f"int{f[0]}-g{f[1] or 'row'}{'-mins' if f[2] else ''}")
def test_the_kernel_is_the_reference_within_its_rounding(matmul, form, dtype):
    """On SmolLM2's matmul shapes and 1 to 16 rows: within the check's bound of the reference, and within
    float32 rounding of what it computes: for bf16 rows the reference over activations rounded to int8
    per block of 32 (emulated), for float32 rows the reference itself."""
    bits, group, with_mins = form
    for out_features, in_features in SMOLLM2_MATMULS:
        if group and in_features % group:
            continue  # (576 inputs do not take groups of 128)
        qw = quant_probe(bits, group, out_features, in_features, with_mins, seed=out_features + in_features)
        assert matmul.kernel_checked(bits, qw.group_size, in_features, dtype)
        for rows in (1, 5, DECODE_ROWS):
            x = probe_inputs(rows, in_features, dtype, torch.Generator().manual_seed(rows))
            actual = matmul.matmul(x, qw)
            assert actual.dtype == dtype and actual.shape == (rows, out_features)
            assert within_quant_bound(actual, x, qw, act_quantized=dtype == torch.bfloat16)
            expected = emulated(x, qw) if dtype == torch.bfloat16 else x.double() @ dequantize(qw).double().T
            magnitude = x.double().abs() @ term_magnitudes(qw).T
            slack = 1e-5 * magnitude + (expected.abs() * 2**-8 if dtype == torch.bfloat16 else 0) + 1e-30
            assert ((actual.double() - expected).abs() <= slack).all()


@pytest.mark.parametrize("form", FORMATS, ids=lambda f: f"int{f[0]}-g{f[1] or 'row'}{'-mins' if f[2] else ''}")
def test_a_rows_bits_do_not_depend_on_its_company(matmul, form):
    """bf16 rows: one row alone (four weight rows by one row a tile), among 16 rows (four weight rows by
    four rows), among two, three or seven, split over one thread or two, and an output count that is
    not a multiple of four (a thread's last outputs one weight row a tile): the same bits for every
    row (a request's tokens must not depend on the batch it decodes in). Every tile
    sums its lanes in one order (reduce4 in quant_kernels.c); this catches a tile that mixes up rows or
    outputs, while an order of sums that differed would show here only where it moves a bf16 rounding."""
    bits, group, with_mins = form
    qw = quant_probe(bits, group, 203, 768, with_mins, seed=11)
    x = probe_inputs(DECODE_ROWS, 768, torch.bfloat16, torch.Generator().manual_seed(11))
    together = matmul.matmul(x, qw)
    for count in (1, 2):
        with torch_threads(count):
            for r in (0, 5, DECODE_ROWS - 1):
                assert torch.equal(matmul.matmul(x[r:r + 1], qw), together[r:r + 1])
            for start, end in ((3, 6), (8, 10), (2, 9)):  # three rows, two, seven (a tile of four and one of three)
                assert torch.equal(matmul.matmul(x[start:end], qw), together[start:end])


@pytest.mark.parametrize("form", FORMATS, ids=lambda f: f"int{f[0]}-g{f[1] or 'row'}{'-mins' if f[2] else ''}")
def test_amx_tiles_give_each_row_the_bits_it_has_alone(matmul, form):
    """Where the CPU has AMX int8 (kernels/quant_amx_int.c), decode steps of several rows take their
    integer sums from tiles (two units a tile product up to 8 rows, one above) and the VNNI kernel's
    float steps: every row's bits equal that row computed alone by the VNNI kernel, for every row count
    (an output count that is not a multiple of 16, input sizes with a part-filled last span of units)."""
    if not matmul.amx_int:
        pytest.skip("no AMX int8 tiles here (or ONEDNN_MAX_CPU_ISA keeps AMX off)")
    bits, group, with_mins = form
    for out_features, in_features in ((203, 768), (40, 576), (17, 1536)):
        if group and in_features % group:
            continue
        qw = quant_probe(bits, group, out_features, in_features, with_mins, seed=in_features)
        x = probe_inputs(DECODE_ROWS, in_features, torch.bfloat16, torch.Generator().manual_seed(in_features))
        alone = torch.cat([matmul.matmul(x[r:r + 1], qw) for r in range(DECODE_ROWS)])
        for rows in (1, 2, 5, 8, 9, DECODE_ROWS):
            assert torch.equal(matmul.matmul_amx(x[:rows], qw), alone[:rows]), rows
        assert torch.equal(matmul.matmul(x, qw), alone)  # (a step of 16 rows takes the tiles)


def panels_in_decode_order(matmul, x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """x @ W.T through quant_gemm_vnni.c's panels in the decode kernel's order, called alone (quant_matmul
    hands bf16 steps of 8 rows or more to it)."""
    lib, rows, k = matmul.lib, x.shape[0], x.shape[1]
    scratch = torch.empty(rows * lib.quant_row_scratch_bytes(k, qw.group_size) + 64, dtype=torch.uint8)
    xq = (scratch.data_ptr() + 63) // 64 * 64
    x_row = lib.quant_quantize_rows(x.data_ptr(), x.stride(0), rows, k, qw.group_size, qw.bits, xq)
    out = torch.empty((rows, qw.out_features), dtype=torch.bfloat16)
    mins = None if qw.mins is None else qw.mins.data_ptr()
    assert lib.quant_panels_in_decode_order(xq, x_row, rows, k, qw.qweight.data_ptr(), qw.scales.data_ptr(), mins,
                                            qw.out_features, qw.bits, qw.group_size, out.data_ptr(), out.stride(0),
                                            torch.get_num_threads()) == 0
    return out


@pytest.mark.parametrize("form", [f for f in FORMATS if f[1] != 16], ids=FORM_ID)
def test_panels_give_each_row_the_bits_the_decode_kernel_gives_it_alone(matmul, form):
    """Steps of 8 to 16 bf16 rows run through 16-output panels (quant_gemm_vnni.c) that sum each output's
    terms into 16 accumulators as the decode kernel sums them into its lanes, and add those in its
    tree: every row's bits equal that row computed alone by the decode kernel (an output count that
    is not a multiple of 16, input sizes with a part-filled last span of units, one thread or two)."""
    bits, group, with_mins = form
    for out_features, in_features in ((203, 768), (40, 576), (17, 1536), (1536, 576)):
        if group and in_features % group:
            continue
        qw = quant_probe(bits, group, out_features, in_features, with_mins, seed=in_features + 1)
        x = probe_inputs(DECODE_ROWS, in_features, torch.bfloat16, torch.Generator().manual_seed(in_features))
        alone = torch.cat([matmul.matmul(x[r:r + 1], qw) for r in range(DECODE_ROWS)])
        for count in (1, 2):
            with torch_threads(count):
                for rows in (1, 3, 8, 13, DECODE_ROWS):
                    assert torch.equal(panels_in_decode_order(matmul, x[:rows], qw), alone[:rows]), rows
        assert torch.equal(matmul.matmul(x, qw), alone)  # (a step of 16 rows takes the panels)


def test_a_large_int8_weight_takes_the_amx_tiles_from_fewer_rows(matmul):
    """Where the CPU has AMX int8, a decode step of CPU_AMX_LARGE_ROWS rows takes its sums from the tiles
    for an int8 weight of CPU_AMX_LARGE_BYTES or more (an output head, a 7B model's layers: measured
    faster there) and from the VNNI kernel for a smaller one or an int4 one (which take the tiles from
    CPU_AMX_ROWS rows); each row's bits are those it has alone either way."""
    if not matmul.amx_int:
        pytest.skip("no AMX int8 tiles here (or ONEDNN_MAX_CPU_ISA keeps AMX off)")
    assert CPU_AMX_LARGE_ROWS < min(CPU_AMX_ROWS.values())
    large = -(-CPU_AMX_LARGE_BYTES // 576)  # outputs of 576 inputs that make a large int8 weight
    x = probe_inputs(CPU_AMX_LARGE_ROWS, 576, torch.bfloat16, torch.Generator().manual_seed(5))
    for bits, out_features, tiles in ((8, large, True), (8, 576, False), (4, large, False)):
        qw = quant_probe(bits, 32, out_features, 576, bits == 4, seed=5)
        fresh = CpuQuantMatmul()
        out = fresh.matmul(x, qw)
        assert fresh.amx_ran == tiles, (bits, out_features)
        assert torch.equal(out, torch.cat([fresh.matmul(x[r:r + 1], qw) for r in range(CPU_AMX_LARGE_ROWS)]))


def test_the_layer_in_one_c_call_carries_each_matrix_its_own_amx_threshold():
    """quant_layer.c's matrices take the tiles from the rows their struct says (no rule of its own in
    C): that field is `cpu_amx_rows` of the matrix, so a large int8 one (the test models' layers are
    all small) gets CPU_AMX_LARGE_ROWS, a small int8 or a large int4 one CPU_AMX_ROWS[bits]."""
    from llmrun.kernels.quant_layer import _matrix

    large = -(-CPU_AMX_LARGE_BYTES // 576)
    for bits, out_features, rows in ((8, large, CPU_AMX_LARGE_ROWS), (8, 576, CPU_AMX_ROWS[8]),
                                     (4, large, CPU_AMX_ROWS[4])):
        qw = quant_probe(bits, 32, out_features, 576, bits == 4, seed=5)
        struct = _matrix(qw)
        assert (struct.amx_from, struct.n, struct.k, struct.bits) == (rows, out_features, 576, bits)
        assert struct.qweight == qw.qweight.data_ptr()


def test_amx_tiles_are_off_where_amx_checks_are_failed_on_purpose(monkeypatch):
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "amx")
    assert not CpuQuantMatmul().amx_int


def test_a_large_model_row_and_a_strided_input(matmul):
    """A 14336-wide down projection (Llama 3 8B) and an input row that is a view with a wider stride."""
    qw = quant_probe(4, 64, 64, 14336, True, seed=1)
    wide = probe_inputs(2, 2 * 14336, torch.bfloat16, torch.Generator().manual_seed(1))
    x = wide[:, :14336]
    assert x.stride(0) == 2 * 14336
    assert within_quant_bound(matmul.linear(x, qw), x, qw, act_quantized=True)
    assert within_quant_bound(matmul.linear(x.float(), qw), x.float(), qw, act_quantized=False)


@pytest.mark.parametrize("mutation", ["swapped nibbles", "mins dropped", "groups shifted", "activation scales shifted"])
def test_the_check_refuses_a_kernel_that_misreads_the_format(mutation):
    """What a kernel that read the format wrongly would give falls outside the bound on the probe data."""

    def misread(x, qw):
        if mutation == "swapped nibbles":
            q = unpack_int4(qw.qweight).reshape(qw.out_features, -1, 2).flip(-1).reshape(qw.out_features, -1)
            wrong = QuantWeight(4, qw.group_size, qw.out_features, qw.in_features, pack_int4(q), qw.scales, qw.mins)
        elif mutation == "mins dropped":
            wrong = QuantWeight(4, qw.group_size, qw.out_features, qw.in_features, qw.qweight, qw.scales,
                                torch.zeros_like(qw.mins))
        elif mutation == "groups shifted":
            wrong = QuantWeight(4, qw.group_size, qw.out_features, qw.in_features, qw.qweight,
                                qw.scales.roll(1, dims=1), qw.mins.roll(1, dims=1))
        else:  # activations' blocks of 32 rounded with their neighbour's scale
            shifted = x.reshape(x.shape[0], -1, ACT_BLOCK)
            steps = shifted.abs().amax(-1, keepdim=True).roll(1, dims=1) / 127
            steps = torch.where(steps > 0, steps, torch.ones_like(steps))
            return quant_linear((torch.round(shifted / steps).clamp(-127, 127) * steps).reshape(x.shape), qw)
        return quant_linear(x, wrong)

    assert checked_on(quant_linear, 4, 32, 576, torch.float32, act_quantized=True, name="test")
    assert not checked_on(misread, 4, 32, 576, torch.float32, act_quantized=True, name="test")


def test_a_check_forced_to_fail_keeps_the_kernel_off(monkeypatch):
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "quant")
    matmul = CpuQuantMatmul()
    assert not matmul.kernel_checked(4, 32, 576, torch.bfloat16)
    qw = quant_probe(4, 32, 64, 576, True, seed=3)
    x = probe_inputs(1, 576, torch.float32, torch.Generator().manual_seed(3))
    assert torch.equal(matmul.linear(x, qw), F.linear(x, dequantize(qw)))  # the prompt path: the reference
    assert not matmul.ran


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_decode_step_the_kernel_does_not_take_dequantizes_a_large_weight_in_pieces(monkeypatch, dtype):
    """A CPU without AVX-512 VNNI (or a failed check): a decode step over an output head never holds the
    whole weight dequantized (SmolLM2's head: 57 MB in bf16, beyond what a plan reserves), only
    `chunk_rows` outputs of it at a time, in one buffer; the outputs are the whole weight's."""
    if load_quant_library() is None:
        pytest.skip("no C compiler here: decode steps run the reference (tests/quant/test_format.py)")
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "quant,vnni_gemm,amx")
    matmul = CpuQuantMatmul()
    qw = quant_probe(8, 32, 2 * chunk_rows(576) + 7, 576, False, seed=4)
    asked = []
    dequantized = matmul.dequantized
    monkeypatch.setattr(matmul, "dequantized", lambda w, dt, out=None: asked.append((w.out_features, out is not None))
                        or dequantized(w, dt, out))
    x = probe_inputs(3, 576, dtype, torch.Generator().manual_seed(4))
    bias = torch.randn(qw.out_features, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = matmul.linear(x, qw, bias)
    assert asked == [(chunk_rows(576), True), (chunk_rows(576), True), (7, True)]
    torch.testing.assert_close(out, linear(x, dequantize(qw).to(dtype), bias))  # (bits alike here; not promised)
    assert not matmul.ran


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMATS, ids=lambda f: f"int{f[0]}-g{f[1] or 'row'}{'-mins' if f[2] else ''}")
def test_prompt_chunks_run_a_gemm_over_the_reference_weight(form, dtype):
    """More rows than a decode step: the weight dequantized in C is format.dequantize's, rounded to the
    run dtype, bit for bit, and the matmul is ATen's over it (bf16 rows where the AMX GEMM passed its
    check: that GEMM's, tests/model/test_quant_amx.py; else where the VNNI GEMM passed: that one's,
    tests/model/test_quant_vnni_gemm.py)."""
    if load_quant_library() is None:
        pytest.skip("no C compiler here: prompt chunks run the reference")
    bits, group, with_mins = form
    matmul = CpuQuantMatmul()
    qw = quant_probe(bits, group, 200, 768, with_mins, seed=7)
    assert torch.equal(matmul.dequantized(qw, dtype), dequantize(qw).to(dtype))
    x = probe_inputs(DECODE_ROWS + 1, 768, dtype, torch.Generator().manual_seed(7))
    amx = dtype == torch.bfloat16 and matmul.gemm_checked(bits, qw.group_size, 768)
    vnni = dtype == torch.bfloat16 and not amx and matmul.vnni_gemm_checked(bits, qw.group_size, 768)
    expected = (matmul.gemm(x, qw) if amx else matmul.vnni_gemm(x, qw) if vnni
                else linear(x, dequantize(qw).to(dtype)))
    assert torch.equal(matmul.linear(x, qw), expected)
    assert matmul.gemm_ran is amx and matmul.vnni_gemm_ran is vnni


@pytest.mark.parametrize("with_mins", [False, True])
def test_a_weight_dequantized_one_value_at_a_time_is_the_reference_too(with_mins):
    """A group that is not a multiple of 16 (a per-channel int8 weight of 72 inputs) takes the C
    code's one-value-at-a-time loop, as every weight does on a CPU without AVX-512."""
    if load_quant_library() is None:
        pytest.skip("no C compiler here: prompt chunks run the reference")
    qw = quant_probe(8, 72, 40, 72, with_mins, seed=5)
    for dtype in DTYPES:
        assert torch.equal(CpuQuantMatmul().dequantized(qw, dtype), dequantize(qw).to(dtype))


def test_the_reference_is_dequantize_then_matmul():
    """quant_linear on a weight small enough to write out: w = q * scale + min per group of 32."""
    q = torch.arange(64, dtype=torch.uint8).reshape(1, 64) % 16
    qw = QuantWeight(4, 32, 1, 64, pack_int4(q), torch.tensor([[0.5, -2.0]]), torch.tensor([[1.0, 3.0]]))
    x = torch.ones(1, 64)
    x[0, 40] = 2.0
    w = torch.cat((q[0, :32] * 0.5 + 1.0, q[0, 32:] * -2.0 + 3.0))
    assert torch.equal(quant_linear(x, qw), (x @ w.float()).reshape(1, 1))
    assert torch.equal(PLAIN.linear(x, qw), quant_linear(x, qw))
