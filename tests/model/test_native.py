"""The fused CPU decode kernels (kernels/native.py): bit-identical to ATen, or not used at all."""

import pytest
import torch
import torch.nn.functional as F

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.model.layers import rms_norm
from llmrun.kernels.native import LayerShape, NativeKernels, load_library
from llmrun.model.rope import apply_rope
from tests.checkpoints import llama_config, save_checkpoint
from tests.kernel_checks import TINY_MATMULS, gemv_passes, gemv_should_pass, layer_passes
from tests.parity import greedy_with_logits

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def lib():
    library = load_library()
    if library is None:
        pytest.skip("no C compiler here: the ATen path runs (covered by every other test)")
    return library


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("native") / "llama", llama_config(), seed=11)


def kernels_for(dtype, hidden_size, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=0):
    shape = LayerShape(hidden_size, num_heads, num_kv_heads, head_dim, 1e-5, intermediate_size)
    kernels = NativeKernels.for_decoder(dtype, torch.device("cpu"), shape)
    assert kernels is not None, "the self-check rejected the kernels on this machine"
    return kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 3072])
def test_add_rms_norm_matches_aten_bit_for_bit(lib, dtype, hidden):
    kernels = kernels_for(dtype, hidden)
    generator = torch.Generator().manual_seed(hidden)
    for trial in range(60):
        rows = 1 + trial % 4
        scale = 10.0 ** (trial % 7 - 3)
        hidden_in = (torch.randn(rows, hidden, generator=generator) * scale).to(dtype)
        delta = (torch.randn(rows, hidden, generator=generator) * scale).to(dtype)
        weight = (torch.randn(hidden, generator=generator) * 0.3 + 1).to(dtype)
        summed, normed = kernels.add_rms_norm(hidden_in, delta, weight)
        assert torch.equal(summed, hidden_in + delta)
        assert torch.equal(normed, rms_norm(hidden_in + delta, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 16), (32, 8, 128)])
def test_rope_and_cache_writes_match_aten(lib, dtype, heads):
    q_heads, kv_heads, head_dim = heads
    kernels = kernels_for(dtype, 64, q_heads, kv_heads, head_dim)
    generator = torch.Generator().manual_seed(head_dim)
    rows = 3
    qkv = torch.randn(rows, (q_heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    angles = torch.rand(rows, head_dim // 2, generator=generator) * 100
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype).unsqueeze(1)
    sin_folded = torch.cat((-angles.sin(), angles.sin()), -1).to(dtype).unsqueeze(1)
    k_pool, v_pool = torch.zeros(10, kv_heads, head_dim, dtype=dtype), torch.zeros(10, kv_heads, head_dim, dtype=dtype)
    slots = torch.tensor([7, 2, 5])
    q = kernels.rope_qkv(qkv, cos, sin_folded, k_pool, v_pool, slots)
    qk = apply_rope(qkv[:, : (q_heads + kv_heads) * head_dim].view(rows, -1, head_dim), cos, sin_folded)
    assert torch.equal(q, qk[:, :q_heads])
    assert torch.equal(k_pool[slots], qk[:, q_heads:])
    assert torch.equal(v_pool[slots], qkv[:, (q_heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim))
    untouched = [i for i in range(10) if i not in (7, 2, 5)]
    assert not k_pool[untouched].any() and not v_pool[untouched].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1536, 100])
def test_silu_mul_matches_aten_bit_for_bit(lib, dtype, n):
    kernels = kernels_for(dtype, 64, intermediate_size=n)
    if kernels.exp_fn is None and n % 16 == 0:
        pytest.skip("ATen's vectorised exp is not reachable here (not x86-64 Linux, or no AVX2)")
    if kernels.exp_fn is None:
        # 100 = 6 vectors + a tail per row, where ATen's loop over the whole tensor puts its tails
        # elsewhere: in float32 the check finds the difference and leaves SiLU to ATen.
        assert not kernels.can_silu_mul(1)
        return
    generator = torch.Generator().manual_seed(n)
    for rows in (1, 2, 9):
        fused = (torch.randn(rows, 2 * n, generator=generator) * 8).to(dtype)
        gate, up = fused.chunk(2, dim=-1)
        assert torch.equal(kernels.silu_mul(gate, up), F.silu(gate) * up)


def test_the_self_check_rejects_kernels_that_round_differently(lib):
    # Summing in 3-float vectors instead of ATen's order changes the norm's rounding somewhere.
    assert not NativeKernels(lib, torch.float32, LayerShape(576, 9, 3, 64, 1e-5), lanes=3).check()


def test_the_silu_check_compares_with_atens_silu(lib, monkeypatch):
    kernels = kernels_for(torch.float32, 64, intermediate_size=256)
    if kernels.exp_fn is None:
        pytest.skip("ATen's vectorised exp is not reachable here")
    assert kernels._silu_mul_matches()
    real = F.silu
    monkeypatch.setattr(F, "silu", lambda x: real(x) * (1 + 2**-20))  # a SiLU that rounds differently
    assert not kernels._silu_mul_matches()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_with_kernels_gives_the_aten_paths_logits_and_tokens(lib, checkpoint, dtype, monkeypatch):
    engine = build_engine(checkpoint, EngineOptions(dtype=dtype, gpu_mem_bytes=0))
    assert isinstance(engine.decoder.kernels, NativeKernels)
    prompt = list(range(5, 40))
    fused_tokens, fused_logits = greedy_with_logits(engine, prompt, 24)
    monkeypatch.setenv("LLMRUN_NO_NATIVE", "1")
    engine = build_engine(checkpoint, EngineOptions(dtype=dtype, gpu_mem_bytes=0))
    assert engine.decoder.kernels.name is None  # ATen's ops
    aten_tokens, aten_logits = greedy_with_logits(engine, prompt, 24)
    assert fused_tokens == aten_tokens
    assert torch.equal(fused_logits, aten_logits)


def test_without_a_compiler_the_aten_path_runs(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLMRUN_CACHE", str(tmp_path / "cache"))
    load_library.cache_clear()
    try:
        assert load_library() is None
        engine = build_engine(checkpoint, EngineOptions(dtype="float32", gpu_mem_bytes=0))
        assert engine.decoder.kernels.name is None
        tokens, _ = greedy_with_logits(engine, list(range(5, 20)), 4)
        assert len(tokens) == 4
    finally:
        load_library.cache_clear()  # the next test builds (or finds) the real library again
    assert not any((tmp_path / "cache").rglob("*.so"))


def test_llmrun_no_native_turns_the_kernels_off(lib, checkpoint, monkeypatch):
    monkeypatch.setenv("LLMRUN_NO_NATIVE", "1")
    assert build_engine(checkpoint, EngineOptions(dtype="float32", gpu_mem_bytes=0)).decoder.kernels.name is None


def test_with_aten_below_avx512_the_avx512_kernels_stay_off(lib, monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 (how tests/test_simulated_cpus.py hides AVX-512) keeps the C kernels'
    AVX-512 code off too, as a CPU without AVX-512 does: no GEMV, no float32 layer."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not kernels_for(torch.bfloat16, 64).gemv
    assert kernels_for(torch.float32, 64, intermediate_size=128).layer is None


def test_llmrun_fail_checks_fails_the_named_checks(lib, monkeypatch):
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "layer, gemv")
    assert not gemv_passes(128, 64) and not layer_passes()
    assert kernels_for(torch.float32, 64).check()  # the others still run


# -- the bf16 GEMV over oneDNN-packed weights (native_gemv.c) ------------------------------------
# Whether it runs follows its check against oneDNN (tests/kernel_checks.py), which must pass where
# oneDNN runs its AMX kernel: tests/test_simulated_cpus.py runs these with AMX hidden and more.
@pytest.fixture(scope="module")
def gemv_kernels(lib):
    kernels = kernels_for(torch.bfloat16, 64)
    assert kernels.gemv or not gemv_should_pass()
    if not kernels.gemv:
        pytest.skip("no AVX-512 BF16 for ATen here (or no OpenMP in the compiler): oneDNN runs every matmul")
    return kernels


def packed(weight):
    from llmrun.weights.packing import pack_weight

    result = pack_weight(weight)
    assert result.is_mkldnn
    return result


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (128, 64), (49152, 576)])
def test_gemv_gives_onednns_bits(gemv_kernels, shape):
    n, k = shape
    generator = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=generator) * 0.05).to(torch.bfloat16)
    w = packed(weight)
    if not gemv_kernels._gemv_checked(w):
        assert not gemv_should_pass(), "oneDNN's AMX matmul should match the GEMV"
        x = torch.randn(1, k, generator=generator).to(torch.bfloat16)  # the GEMV stays off: oneDNN's bits
        assert torch.equal(gemv_kernels.linear(x, w), F.linear(x, weight))
        assert gemv_kernels._gemv_weights[id(w)][1] is None
        return
    pointer = torch.ops.mkldnn.data_ptr(w)
    for rows in (1, 2, 3, 16):  # decoding runs one row (more go to oneDNN), the check tries more
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        out = gemv_kernels.linear(x, w) if rows == 1 else gemv_kernels._gemv(x, pointer, n, k)
        assert torch.equal(out, torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
        assert torch.equal(out, F.linear(x, weight))  # what transformers computes
    wide = torch.randn(1, 3 * k, generator=generator).to(torch.bfloat16)[:, k : 2 * k]  # a row stride of 3k
    assert torch.equal(gemv_kernels._gemv(wide, pointer, n, k), F.linear(wide, weight))


def test_gemv_leaves_other_shapes_and_row_counts_to_onednn(gemv_kernels, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(100, 64, generator=generator).to(torch.bfloat16)
    x = torch.randn(1, 64, generator=generator).to(torch.bfloat16)
    assert torch.equal(gemv_kernels.linear(x, packed(weight)), F.linear(x, weight))
    assert gemv_kernels._gemv_shapes[(100, 64)] is False  # not whole blocks of 32 outputs
    w = packed(torch.randn(128, 64, generator=generator).to(torch.bfloat16))
    if not gemv_kernels._gemv_checked(w):  # (the self-check runs the GEMV on more rows)
        pytest.skip("oneDNN sums in another order on this CPU: the GEMV stays off")
    calls = []
    real = gemv_kernels._gemv
    monkeypatch.setattr(gemv_kernels, "_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, 2, 40):  # one sequence's step; two sequences' (AMX is faster); a prefill chunk
        gemv_kernels.linear(torch.randn(rows, 64, generator=generator).to(torch.bfloat16), w)
    assert calls == [1]


def test_the_gemv_check_catches_another_order_of_summation(gemv_kernels, monkeypatch):
    import llmrun.kernels.native as native

    weight = packed(torch.randn(256, 576).to(torch.bfloat16))
    if not gemv_kernels._gemv_matches(weight):
        pytest.skip("oneDNN sums in another order on this CPU: the GEMV stays off")
    # Were the reference to sum in float32 in MKL's order and round once (right to ~1 ulp, other
    # bits), the check must see it.
    other_order = lambda x, w, bias=None: F.linear(x.float(), w.to_dense().float()).to(torch.bfloat16)
    monkeypatch.setattr(native, "linear", other_order)
    assert not gemv_kernels._gemv_matches(weight)


def test_a_bf16_engine_runs_its_matmuls_in_the_gemv(lib, checkpoint):
    engine = build_engine(checkpoint, EngineOptions(dtype="bfloat16", gpu_mem_bytes=0))
    native = engine.decoder.kernels
    if not native.gemv:
        pytest.skip("no AVX-512 BF16 here")
    greedy_with_logits(engine, list(range(5, 40)), 3)
    # qkv, o, gate/up, down and the head (the tiny model's shapes are whole blocks of 32)
    assert set(native._gemv_shapes) == set(TINY_MATMULS)
    assert native._gemv_shapes == {shape: gemv_passes(*shape) for shape in TINY_MATMULS}
    assert all(native._gemv_shapes.values()) or not gemv_should_pass()
