"""The float32 decode layer in one C call (kernels/native_layer.py): ATen's bits, or not used at all."""

import pytest
import torch

import llmrun.model.attention as attention
from llmrun.engine.build import EngineOptions, build_engine
from llmrun.kv.metadata import AttentionMetadata
from llmrun.kernels.native import LayerShape, NativeKernels, load_library
from llmrun.kernels.native_layer import NativeLayer
from llmrun.kernels.row_check import rows_alone
from tests.checkpoints import llama_config, save_checkpoint
from tests.kernel_checks import layer_passes, layer_should_pass
from tests.parity import batched_and_alone, greedy_with_logits

SHAPES = [(9, 3, 64), (4, 4, 16), (8, 2, 128)]  # SmolLM2's heads, MHA, wide GQA heads


def test_the_layer_is_used_where_its_check_should_pass():
    """Where there is an OpenMP build with the layer, ATen runs AVX-512 and exports MKL's sgemm_, its
    check passes; elsewhere (tests/test_simulated_cpus.py takes each away) the layer stays off."""
    assert layer_passes() is layer_should_pass()


@pytest.fixture(scope="module")
def lib():
    if not layer_passes():  # the tests below follow what the check decided here
        pytest.skip("the C layer is off here (no OpenMP build, ATen without AVX-512, or its check failed)")
    return load_library()


def layer_for(num_heads, num_kv_heads, head_dim):
    shape = LayerShape(num_heads * head_dim, num_heads, num_kv_heads, head_dim, 1e-5, intermediate_size=128)
    kernels = NativeKernels.for_decoder(torch.float32, torch.device("cpu"), shape)
    assert kernels is not None and kernels.layer is not None, "the self-check rejected the C layer here"
    return kernels.layer


@pytest.mark.parametrize("heads", SHAPES)
def test_attention_gives_sdpas_bits_over_blocks_and_tails(lib, heads):
    layer = layer_for(*heads)
    num_heads, num_kv_heads, head_dim = heads
    generator = torch.Generator().manual_seed(head_dim)
    for length in (1, 3, 16, 100, 511, 512, 513, 1024, 1300):
        k_pool = torch.randn(length + 4, num_kv_heads, head_dim, generator=generator) * 2
        v_pool = torch.randn(length + 4, num_kv_heads, head_dim, generator=generator)
        q = torch.randn(1, num_heads, head_dim, generator=generator)
        meta = AttentionMetadata(torch.tensor([length + 2]), (0,), (1,), (length - 1,), (length,), (), None, None,
                                 decode_span=(3, length))
        expected = attention.paged_attention(q, k_pool, v_pool, meta, head_dim**-0.5)
        assert torch.equal(layer.attend(q, k_pool, v_pool, 3, length, head_dim**-0.5), expected.flatten())


def test_the_attention_check_sees_another_exp(lib, monkeypatch):
    layer = layer_for(9, 3, 64)
    assert layer.attention_matches()
    real = attention.attend  # an SDPA whose softmax rounds differently: sharper by one part in 2^20
    monkeypatch.setattr(attention, "attend",
                        lambda q, k, v, mask, causal, scale, cap: real(q, k, v, mask, causal, scale * (1 + 2**-20), cap))
    assert not layer.attention_matches()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = llama_config(max_position_embeddings=1024, num_hidden_layers=2)
    return save_checkpoint(tmp_path_factory.mktemp("layer") / "llama", config, seed=5)


def count_runs(engine, monkeypatch) -> list:
    runs = []
    real = NativeLayer.run
    monkeypatch.setattr(NativeLayer, "run", lambda self, *a: runs.append(1) or real(self, *a))
    return runs


@pytest.mark.parametrize("prompt_len", [40, 500])  # decoding inside one block of keys, and past 512
def test_engine_layers_in_c_give_the_fused_paths_logits_and_tokens(lib, checkpoint, monkeypatch, prompt_len):
    engine = build_engine(checkpoint, EngineOptions(dtype="float32", gpu_mem_bytes=0, ctx=1024))
    assert engine.decoder.kernels.layer is not None
    prompt = torch.randint(3, 320, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    runs = count_runs(engine, monkeypatch)
    tokens, logits = greedy_with_logits(engine, prompt, 24)
    assert engine.decoder.kernels.layer.verified is True
    assert len(runs) == 2 + 23 * 2  # the check's two trials, then every decode step (the first token
    # comes from the prefill) in both layers
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "layer")  # the same C kernels without the layer
    engine = build_engine(checkpoint, EngineOptions(dtype="float32", gpu_mem_bytes=0, ctx=1024))
    assert engine.decoder.kernels.name == "C" and engine.decoder.kernels.layer is None
    fused_tokens, fused_logits = greedy_with_logits(engine, prompt, 24)
    assert tokens == fused_tokens
    assert torch.equal(logits, fused_logits)


def prefix_hit_runs(engine, first, second, steps):
    """Greedy tokens and logits of `second` after `first` left its blocks in the prefix cache: the
    second request reuses the shared prefix's blocks and gets new ones elsewhere in the pool."""
    engine.allocator.reset_prefix_cache()
    greedy_with_logits(engine, first, 3)
    return greedy_with_logits(engine, second, steps)


def test_after_a_prefix_cache_hit_the_layer_gathers_its_keys_with_the_same_bits(lib, checkpoint, monkeypatch):
    """A prefix-cache hit leaves a sequence's K/V rows apart in the pool: the C layer then reads them
    through the block table (gathered in order, as ATen's path gathers them) and gives its bits."""
    first = list(range(5, 45))
    second = first[:32] + list(range(100, 110))  # two full blocks of 16 shared
    engine = build_engine(checkpoint, EngineOptions(dtype="float32", gpu_mem_bytes=0, ctx=1024))
    rows = []
    real = NativeLayer.run
    monkeypatch.setattr(NativeLayer, "run",
                        lambda self, step, *a: rows.append(step.rows) or real(self, step, *a))
    tokens, logits = prefix_hit_runs(engine, first, second, 8)
    assert engine.allocator.num_cached_blocks >= 2 and any(rows), "no step read its keys through the block table"
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "layer")
    engine = build_engine(checkpoint, EngineOptions(dtype="float32", gpu_mem_bytes=0, ctx=1024))
    assert engine.decoder.kernels.layer is None
    fused_tokens, fused_logits = prefix_hit_runs(engine, first, second, 8)
    assert tokens == fused_tokens and torch.equal(logits, fused_logits)


def test_a_layer_that_disagrees_with_the_fused_path_is_not_used(lib, checkpoint, monkeypatch):
    engine = build_engine(checkpoint, EngineOptions(dtype="float32", gpu_mem_bytes=0))
    decoder = engine.decoder
    real = type(decoder).layer

    def off_by_a_bit(self, *args):
        hidden, delta = real(self, *args)
        return hidden, delta * (1 + 2**-22)

    runs = count_runs(engine, monkeypatch)
    monkeypatch.setattr(type(decoder), "layer", off_by_a_bit)
    greedy_with_logits(engine, list(range(5, 30)), 4)
    assert decoder.kernels.layer.verified is False and len(runs) == 1  # the check's first trial, then never again


def test_bf16_and_batched_steps_keep_the_fused_path(lib, checkpoint, monkeypatch):
    engine = build_engine(checkpoint, EngineOptions(dtype="bfloat16", gpu_mem_bytes=0))
    assert engine.decoder.kernels.layer is None  # float32 only
    engine = build_engine(checkpoint, EngineOptions(dtype="float32", gpu_mem_bytes=0, batch=2))
    runs = count_runs(engine, monkeypatch)
    together, alone = batched_and_alone(engine, [list(range(5, 30)), list(range(40, 52))], 6)
    assert together == alone
    # the check, then the prompts decoded alone (5 steps each, 2 layers); decoded together, two rows
    # share a forward (the fused path) where the row check passed, else each runs alone (C layers)
    decoded_alone = 2 * 5 * 2
    assert len(runs) == 2 + decoded_alone * (1 if rows_alone(engine.decoder, 2) else 2)


def test_a_layer_that_does_not_build_leaves_the_gemv(lib, tmp_path, monkeypatch):
    import llmrun.kernels.native as native

    broken = tmp_path / "native_layer.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "LAYER_SOURCE", broken)
    monkeypatch.setenv("LLMRUN_CACHE", str(tmp_path / "cache"))
    native.load_library.cache_clear()
    try:
        rebuilt = native.load_library()
        assert rebuilt is not None and not hasattr(rebuilt, "decode_layer_f32")
        assert hasattr(rebuilt, "gemv_bf16_packed") == hasattr(lib, "gemv_bf16_packed")
    finally:
        native.load_library.cache_clear()  # the next test finds the real library again
